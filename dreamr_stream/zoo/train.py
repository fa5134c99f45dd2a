"""Supervised training of the demo target and SFT draft from scratch, on CPU.

Recipe (why, in the model cards): solutions as short per-row steps; the target also learns to
judge steps (a share of items end in ``Check:`` -> `` yes``/`` no`` after a correct or corrupted
candidate); an auxiliary per-cell classification loss on the projected visual tokens keeps
colour and shape in the image tokens (without it the language model learns an "occupied"
shortcut and training washes shape out of the vision tower); the vision tower trains at a
lower learning rate; cosine schedule with a floor so late steps still learn.

The items are the config's task's (``TrainConfig.task``, default the grid), drawn by split and
index as ``task_needs.draw`` gives them; the per-cell loss needs a task with labelled cells
(``task_needs.PerceptionTask``).

Resumable: ``<out>/checkpoint`` holds model, optimiser and data-stream state every
``ckpt_every`` steps; ``<out>/log.jsonl`` one line per log/eval event.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.tasks import DEFAULT_TASK, Split, get_task
from dreamr_stream.training import TrainingConfig, save_atomic, warmup_cosine
from dreamr_stream.zoo.build import (
    ModelShape,
    build_model,
    build_processor,
    build_tokenizer,
    grow_decoder,
)
from dreamr_stream.zoo.data import (
    IGNORE,
    Batch,
    Example,
    collate,
    judge_example,
    judge_item_example,
    solution_example,
    verdict_ids,
    verdict_position,
)
from dreamr_stream.zoo.draft_steps import DraftStep, read_pool
from dreamr_stream.zoo.task_needs import PerceptionTask, draw, perception_task

__all__ = ["TrainConfig", "draft_pool", "load_or_build_processor", "lr_at", "own_choice_flags", "train"]

log = logging.getLogger(__name__)


HELD_OUT_EVERY = 25  # draft-step pool: puzzles held out of training for val_draft_judge_acc


class TrainConfig(TrainingConfig):
    """A zoo model's training run (``zoo/configs/<name>.json``)."""

    name: str = Field(min_length=1)
    shape: ModelShape
    # the task whose items it trains on (``tasks.get_task``): a ``task_needs.PerceptionTask``
    task: str = DEFAULT_TASK
    seed: int = 0
    steps: int = Field(default=1500, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1.5e-3, gt=0.0)
    vision_lr_mult: float = Field(default=0.3, ge=0.0)
    warmup: int = Field(default=80, ge=0)
    min_lr_frac: float = Field(default=0.15, ge=0.0, le=1.0)  # the cosine's floor, a share of lr
    weight_decay: float = Field(default=0.01, ge=0.0)
    judge_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    hard_fraction: float = Field(default=0.15, ge=0.0, le=1.0)
    aux_weight: float = Field(default=0.5, ge=0.0)
    # extra loss on verdict tokens (one token per judge item is a faint signal)
    judge_weight: float = Field(default=0.0, ge=0.0)
    # an error flag supervised at every token of a judge item's candidate, on the hidden state
    # after decoder layer ``flag_layer`` (``_AuxHeads``): the verdict learns to read it
    flag_weight: float = Field(default=0.0, ge=0.0)
    flag_layer: int | None = Field(default=None, ge=0)
    # what the flag says at a candidate token: ``on_track``, the candidate so far is still the
    # reference (``data.Example.flags``); ``own_choice``, this token is the model's own greedy
    # choice after the tokens before it (the check TBVM's likelihood mode makes, one per token,
    # read from the same forward's logits: a label that needs no reference and is never noisy)
    flag_labels: Literal["on_track", "own_choice"] = "on_track"
    # the language-model loss also on the hidden state after decoder layer ``early_exit_layer``
    # (final norm + LM head, as the logit lens reads it): the model predicts the next token
    # early, leaving later layers to check a candidate's tokens against it (see the target's card)
    early_exit_weight: float = Field(default=0.0, ge=0.0)
    early_exit_layer: int | None = Field(default=None, ge=0)
    eval_every: int = Field(default=100, ge=1)
    ckpt_every: int = Field(default=50, ge=1)
    eval_size: int = Field(default=48, ge=1)
    threads: int = Field(default=2, ge=1)
    # A pool of the drafts' own steps (``dreamr zoo draft-steps``) and the share of judge items
    # drawn from it: the mistakes TBVM meets in FPSR, beside the judge set's made-up ones. The
    # pool's steps of every 25th puzzle are held out for ``val_draft_judge_acc``.
    draft_steps: str | None = None
    draft_step_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    # A model folder to start from instead of random weights: a later stage of a recipe (for
    # example solutions only at a low constant learning rate once perception has converged).
    init_from: str | None = None
    # With ``init_from``, a ``shape.layers`` above its depth appends identity-initialised decoder
    # layers on top (``build.grow_decoder``); ``train_only_new_layers`` then freezes everything
    # ``init_from`` had, so its predictions stay as they were and only the new layers (and the
    # training-only heads) learn.
    train_only_new_layers: bool = False
    extra: dict[str, str] = Field(default_factory=dict)  # notes kept with the run

    @model_validator(mode="after")
    def _layers_exist(self) -> TrainConfig:
        last = self.shape.layers - 1
        for weight, name in (("flag_weight", "flag_layer"), ("early_exit_weight", "early_exit_layer")):
            layer = getattr(self, name)
            if getattr(self, weight) > 0 and layer is None:
                raise ValueError(f"{weight} > 0 needs {name}")
            if layer is not None and layer > last:
                raise ValueError(f"{name} {layer}: the model has decoder layers 0..{last}")
        if self.train_only_new_layers and self.init_from is None:
            raise ValueError("train_only_new_layers needs init_from (the model whose layers stay frozen)")
        return self


def load_or_build_processor(folder: Path, task: PerceptionTask | None = None) -> LlavaProcessor:
    """The processor saved in ``folder``, else one built for ``task`` (default: the grid) and saved there."""
    if (folder / "processor_config.json").exists():
        return LlavaProcessor.from_pretrained(folder)
    processor = build_processor(build_tokenizer(task=task), task=task)
    processor.save_pretrained(folder)
    return processor


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from the first step after it down to
    ``min_lr_frac * lr`` at the last step (a floor, so late steps still learn)."""
    end = cfg.warmup + max(1, cfg.steps - cfg.warmup)
    return warmup_cosine(step, peak=cfg.lr, warmup=cfg.warmup, start=cfg.warmup, end=end, floor=cfg.min_lr_frac)


class _AuxHeads(nn.Module):
    """Training-only heads (not shipped) that shape what the model computes inside:

    * ``head``: a per-cell classifier on the projected visual tokens (keeps colour and shape in them);
    * ``flag_head``: on the hidden state after decoder layer ``flag_layer``, at every token of a
      judge item's candidate, whether the candidate so far is still the reference (an error flag
      the verdict token can then read with one attention step; see the target's card)."""

    def __init__(self, hidden: int, cell_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, cell_classes)
        self.flag_head = nn.Linear(hidden, 1)
        self.features: torch.Tensor | None = None
        self.layer_out: torch.Tensor | None = None
        self.early_out: torch.Tensor | None = None

    def attach(self, model: LlavaForConditionalGeneration, flag_layer: int | None, early_layer: int | None) -> None:
        layers = model.model.language_model.layers
        model.model.multi_modal_projector.register_forward_hook(self._keep("features"))  # (B, n_cells, hidden)
        if flag_layer is not None:
            layers[flag_layer].register_forward_hook(self._keep("layer_out"))  # (B, T, hidden)
        if early_layer is not None:
            layers[early_layer].register_forward_hook(self._keep("early_out"))  # (B, T, hidden)
        # the final norm and LM head read the early layer; set past nn.Module so that the model is
        # not registered as a submodule of the heads (its parameters would be optimised twice)
        object.__setattr__(self, "_reader", model)

    def _keep(self, attr: str) -> Callable[[nn.Module, object, torch.Tensor | tuple[torch.Tensor, ...]], None]:
        """A forward hook keeping a module's output (a decoder layer's hidden states) as ``attr``."""

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
            setattr(self, attr, output[0] if isinstance(output, tuple) else output)

        return hook

    def early_exit_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """The language-model loss of the early layer's hidden state through the final norm and LM head."""
        model: LlavaForConditionalGeneration = self.__dict__["_reader"]
        logits = model.lm_head(model.model.language_model.norm(self.early_out))[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    def flag_loss(self, flags: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the flag head where ``flags`` supervises one (0 if nowhere)."""
        assert self.layer_out is not None
        where = flags != IGNORE
        if not bool(where.any()):
            return self.layer_out.sum() * 0.0
        logits = self.flag_head(self.layer_out[where]).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, flags[where].float())


def _progress(name: str, start: int, total: int) -> Callable[[int], None]:
    """A rich progress bar on a terminal; nothing in a background run (the log has it all)."""
    if not sys.stderr.isatty():
        return lambda _step: None
    from rich.progress import Progress

    bar = Progress(transient=False)
    task = bar.add_task(f"training {name}", total=total, completed=start)
    bar.start()

    def update(step: int) -> None:
        bar.update(task, completed=step)
        if step >= total:
            bar.stop()

    return update


def draft_pool(path: str | Path | None) -> tuple[list[DraftStep], list[DraftStep]]:
    """The draft-step pool at ``path`` (``dreamr zoo draft-steps``; none: empty) split into
    (train, held out): every ``HELD_OUT_EVERY``-th puzzle's steps are held out, so no puzzle is on
    both sides."""
    if path is None:
        return [], []
    pool = read_pool(Path(path))
    held_out = [s for s in pool if s.index % HELD_OUT_EVERY == 0]
    if not held_out or len(held_out) == len(pool):
        raise ValueError(f"draft_steps: {path} ({len(pool)} steps) is too small to hold some out")
    return [s for s in pool if s.index % HELD_OUT_EVERY != 0], held_out


def _make_batch(
    cfg: TrainConfig,
    task: PerceptionTask,
    processor: LlavaProcessor,
    rng: random.Random,
    pool: list[DraftStep],
    split: Split = "train",
) -> Batch:
    examples = []
    for _ in range(cfg.batch_size):
        item = draw(task, split, rng.randrange(10**9), hard=rng.random() < cfg.hard_fraction)
        if rng.random() < cfg.judge_fraction:
            if pool and rng.random() < cfg.draft_step_fraction:
                examples.append(judge_item_example(processor, rng.choice(pool).judge_item())[0])
            else:
                examples.append(judge_example(processor, item, rng)[0])
        else:
            examples.append(solution_example(processor, item))
    return collate(examples, processor.tokenizer.pad_token_id)


def _step_loss(model: LlavaForConditionalGeneration, aux: _AuxHeads, batch: Batch, aux_weight: float):
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        labels=batch.labels,
    )
    assert aux.features is not None
    aux_logits = aux.head(aux.features)  # (B, n_cells, classes)
    aux_loss = nn.functional.cross_entropy(aux_logits.flatten(0, 1), batch.cells.flatten())
    return out, aux_loss, out.loss + aux_weight * aux_loss, aux_logits


def own_choice_flags(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Where ``batch.flags`` supervises a flag: 1 if the token there is the model's greedy choice
    after the tokens before it (``logits`` of this forward), else 0; IGNORE elsewhere."""
    own = torch.zeros_like(batch.flags)
    own[:, 1:] = (logits[:, :-1].detach().argmax(-1) == batch.input_ids[:, 1:]).long()
    return torch.where(batch.flags != IGNORE, own, torch.full_like(own, IGNORE))


def _verdict_loss(logits: torch.Tensor, labels: torch.Tensor, verdict: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy on the verdict token of judge items (rows whose last label is a verdict)."""
    last = (labels != IGNORE).long().cumsum(1).argmax(1)  # index of the last supervised token, (B,)
    rows = torch.arange(labels.shape[0])
    gold = labels[rows, last]
    is_judge = (gold == verdict[0]) | (gold == verdict[1])
    if not bool(is_judge.any()):
        return logits.sum() * 0.0
    pred = logits[rows, last - 1]  # logits at t predict token t+1: (B, vocab)
    return nn.functional.cross_entropy(pred[is_judge], gold[is_judge])


@torch.no_grad()
def _verdict_accuracy(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, items: list[tuple[Example, bool]]
) -> float:
    """Share of judge items whose verdict (`` yes`` vs `` no`` after the judge suffix) is right."""
    pos, neg = verdict_ids(processor)
    batch = collate([e for e, _ in items], processor.tokenizer.pad_token_id)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
    ).logits
    verdict_logits = logits[torch.arange(len(items)), verdict_position(batch.attention_mask)]
    said_yes = verdict_logits[:, pos] > verdict_logits[:, neg]
    truth = torch.tensor([c for _, c in items])
    return float((said_yes == truth).float().mean())


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    cfg: TrainConfig,
    aux: _AuxHeads,
    held_out: list[DraftStep] | None = None,
) -> dict[str, float]:
    """Teacher-forced metrics on fixed validation items (the first ``eval_size`` of the task's val
    split): token and whole-step accuracy, judge accuracy on the judge set and on the held-out
    draft steps."""
    model.eval()
    rng = random.Random(1234)
    tok = processor.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    task = get_task(cfg.task)
    items = [task.item("val", i) for i in range(cfg.eval_size)]
    batch = collate([solution_example(processor, item) for item in items], tok.pad_token_id)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    pred = out.logits[:, :-1].argmax(-1)
    gold = batch.labels[:, 1:]
    ok = (pred == gold) | (gold == IGNORE)
    n_steps = steps_ok = rows = rows_ok = 0
    for b in range(gold.shape[0]):
        # a step spans the supervised tokens up to and including its delimiter
        idx = (gold[b] != IGNORE).nonzero().flatten().tolist()
        current: list[int] = []
        k = 0
        for i in idx:
            current.append(i)
            if gold[b, i].item() in (newline, tok.eos_token_id):
                good = bool(ok[b, current].all())
                n_steps += 1
                steps_ok += good
                if k < 4:
                    rows += 1
                    rows_ok += good
                current, k = [], k + 1
    tok_acc = float(ok[gold != IGNORE].float().mean())
    aux_acc = (
        float((aux.head(aux.features).argmax(-1) == batch.cells).float().mean()) if aux.features is not None else 0.0
    )
    metrics = {
        "val_tok_acc": tok_acc,
        "val_step_acc": steps_ok / max(1, n_steps),
        "val_row_acc": rows_ok / max(1, rows),
        "val_aux_cell_acc": aux_acc,
    }
    if cfg.judge_fraction > 0:
        judged = [judge_example(processor, item, rng) for item in items]
        metrics["val_judge_acc"] = _verdict_accuracy(model, processor, judged)
        if held_out:
            drafted = [judge_item_example(processor, s.judge_item()) for s in held_out]
            metrics["val_draft_judge_acc"] = _verdict_accuracy(model, processor, drafted)
    model.train()
    return metrics


def _start_model(cfg: TrainConfig, task: PerceptionTask, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """The model the run starts from: ``init_from``'s weights (grown to ``cfg.shape.layers``, the
    layers it had frozen if ``train_only_new_layers``), or fresh ones of ``cfg.shape``."""
    if cfg.init_from is None:
        return build_model(processor.tokenizer, cfg.shape, cfg.seed, task=task)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
    first_new = grow_decoder(model, cfg.shape.layers, cfg.seed)
    if cfg.train_only_new_layers:
        if first_new == cfg.shape.layers:
            raise ValueError(f"train_only_new_layers: {cfg.init_from} already has {first_new} layers (shape.layers)")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.model.language_model.layers[first_new:].parameters():
            p.requires_grad_(True)
    return model


def _optimizer(cfg: TrainConfig, model: nn.Module, aux: _AuxHeads) -> torch.optim.Optimizer:
    """AdamW with the vision tower at ``vision_lr_mult`` times the learning rate (``lr_mult``)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vision = [p for n, p in params if "vision_tower" in n]
    others = [p for n, p in params if "vision_tower" not in n] + list(aux.parameters())
    groups = [{"params": others, "lr_mult": 1.0}]
    if vision:  # none when the tower is frozen
        groups.append({"params": vision, "lr_mult": cfg.vision_lr_mult})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


class _Run:
    """What a checkpoint holds: the model, the auxiliary head, the optimiser and the data stream."""

    def __init__(
        self, model: LlavaForConditionalGeneration, aux: _AuxHeads, opt: torch.optim.Optimizer, rng: random.Random
    ) -> None:
        self.model, self.aux, self.opt, self.rng = model, aux, opt, rng

    def resume(self, ckpt: Path) -> int:
        """The steps done: restored from ``ckpt`` if a run saved one there, else 0."""
        if not (ckpt / "state.pt").exists():
            return 0
        state = torch.load(ckpt / "state.pt", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.aux.load_state_dict(state["aux"])
        self.opt.load_state_dict(state["opt"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])

    def save(self, ckpt: Path, done: int) -> None:
        ckpt.mkdir(exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "aux": self.aux.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "step": done,
        }
        save_atomic(state, ckpt / "state.pt")


def _train_step(
    cfg: TrainConfig,
    run: _Run,
    task: PerceptionTask,
    processor: LlavaProcessor,
    lr: float,
    verdict: tuple[int, int],
    pool: list[DraftStep],
) -> dict[str, Any]:
    """One optimiser step on a fresh batch; its losses and gradient norm."""
    for g in run.opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
    batch = _make_batch(cfg, task, processor, run.rng, pool)
    out, aux_loss, loss, _ = _step_loss(run.model, run.aux, batch, cfg.aux_weight)
    if cfg.judge_weight > 0:
        loss = loss + cfg.judge_weight * _verdict_loss(out.logits, batch.labels, verdict)
    flag_loss = torch.zeros(())
    if cfg.flag_weight > 0:
        flags = batch.flags if cfg.flag_labels == "on_track" else own_choice_flags(out.logits, batch)
        flag_loss = run.aux.flag_loss(flags)
    loss = loss + cfg.flag_weight * flag_loss
    early = run.aux.early_exit_loss(batch.labels) if cfg.early_exit_weight > 0 else torch.zeros(())
    loss = loss + cfg.early_exit_weight * early
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(nn.utils.clip_grad_norm_(run.model.parameters(), 1.0))
    run.opt.step()
    return {
        "loss": float(out.loss.detach()),
        "aux": float(aux_loss.detach()),
        "flag": float(flag_loss.detach()),
        "early": float(early.detach()),
        "lr": lr,
        "gnorm": gnorm,
    }


def _write(logf: IO[str], rec: dict[str, Any]) -> None:
    logf.write(json.dumps(rec) + "\n")
    logf.flush()


def train(cfg: TrainConfig, out_dir: Path, processor_dir: Path, resume: bool = True) -> Path:
    """Train (or resume) and return the folder of the final model (fp32, ``save_pretrained``)."""
    torch.set_num_threads(cfg.threads)
    # the per-cell loss needs the task's cells: refused before anything is written
    task = perception_task(get_task(cfg.task), needed_by="the zoo trainer")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    processor = load_or_build_processor(processor_dir, task)
    ckpt = out_dir / "checkpoint"
    model = _start_model(cfg, task, processor)
    aux = _AuxHeads(cfg.shape.hidden, task.cell_classes)
    aux.attach(model, cfg.flag_layer, cfg.early_exit_layer)
    run = _Run(model, aux, _optimizer(cfg, model, aux), random.Random(cfg.seed))
    start = run.resume(ckpt) if resume else 0
    if start:
        log.info("resumed %s at step %d", cfg.name, start)
    model.train()
    verdict = verdict_ids(processor)
    pool, held_out = draft_pool(cfg.draft_steps)
    logf = (out_dir / "log.jsonl").open("a")
    t0 = time.perf_counter()
    progress = _progress(cfg.name, start, cfg.steps)
    for step in range(start, cfg.steps):
        progress(step)
        rec = _train_step(cfg, run, task, processor, lr_at(cfg, step), verdict, pool)
        done = step + 1
        if done % 10 == 0:
            _write(logf, {"step": done, **rec, "s_per_step": (time.perf_counter() - t0) / 10})
            t0 = time.perf_counter()
            log.info("%s step %d loss %.4f aux %.4f lr %.2e", cfg.name, done, rec["loss"], rec["aux"], rec["lr"])
        if done % cfg.eval_every == 0 or done == cfg.steps:
            metrics = {"step": done, **evaluate(model, processor, cfg, aux, held_out)}
            _write(logf, metrics)
            log.info("%s eval %s", cfg.name, metrics)
            model.save_pretrained(out_dir / f"step{done:05d}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            run.save(ckpt, done)
    progress(cfg.steps)
    final = out_dir / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    return final


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train a demo model of the zoo.")
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--processor", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig.from_json(args.config)
    if args.steps is not None:
        cfg = cfg.model_copy(update={"steps": args.steps})
    train(cfg, args.out, args.processor, resume=not args.no_resume)


if __name__ == "__main__":
    main()
