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

The training-only heads and their losses are ``zoo.heads``; the validation metrics
``zoo.validation``.

Resumable: ``<out>/checkpoint`` holds model, optimiser and data-stream state every
``ckpt_every`` steps; ``<out>/log.jsonl`` one line per log/eval event.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.errors import ConfigError
from dreamr_stream.jsonl import open_append
from dreamr_stream.tasks import DEFAULT_TASK, Split, TaskItem, get_task
from dreamr_stream.training import TrainingConfig, load_checkpoint, save_atomic, save_pretrained_atomic, warmup_cosine
from dreamr_stream.zoo.build import (
    ModelShape,
    build_model,
    build_processor,
    build_tokenizer,
    grow_decoder,
)
from dreamr_stream.zoo.data import Batch, collate, judge_example, judge_item_example, solution_example, verdict_ids
from dreamr_stream.zoo.digits import DigitTies
from dreamr_stream.zoo.draft_steps import DraftStep, read_pool
from dreamr_stream.zoo.heads import AuxHeads, own_choice_flags, step_loss, verdict_loss
from dreamr_stream.zoo.task_needs import PerceptionTask, draw, perception_task
from dreamr_stream.zoo.validation import evaluate

__all__ = ["TrainConfig", "draft_pool", "has_focus", "load_or_build_processor", "lr_at", "own_choice_flags", "train"]

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
    # Tie the number tokens' embeddings through their digits while training (``zoo.digits``):
    # what a units digit means is then learned from every number that has it. Folded into the
    # embeddings before each save, so what is saved is a plain checkpoint.
    digit_ties: bool = False
    # A share of the batch drawn from items with a step that starts with one of these prefixes
    # (``Sum:``, ``Difference:``): more of the steps a stage is for. Validation then also reports
    # ``val_focus_step_acc``, the teacher-forced exactness of those steps alone.
    focus_prefixes: list[str] = Field(default_factory=list)
    focus_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
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
        if self.focus_fraction > 0 and not self.focus_prefixes:
            raise ValueError("focus_fraction > 0 needs focus_prefixes (the steps to draw more of)")
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


FOCUS_TRIES = 200  # draws to find an item with a focus step before the prefixes are called wrong


def has_focus(item: TaskItem, prefixes: Sequence[str]) -> bool:
    """Whether one of ``item``'s reference steps starts with one of ``prefixes``."""
    return any(step.startswith(tuple(prefixes)) for step in item.steps)


def _draw_item(cfg: TrainConfig, task: PerceptionTask, split: Split, rng: random.Random) -> TaskItem:
    """A training item, hard with ``hard_fraction``; with ``focus_fraction``, one with a focus step."""
    # no draw for it without a focus: a config without one keeps the item stream it always had
    focus = cfg.focus_fraction > 0 and rng.random() < cfg.focus_fraction
    for _ in range(FOCUS_TRIES if focus else 1):
        item = draw(task, split, rng.randrange(10**9), hard=rng.random() < cfg.hard_fraction)
        if not focus or has_focus(item, cfg.focus_prefixes):
            return item
    raise ConfigError(f"focus_prefixes {cfg.focus_prefixes}: no step of {FOCUS_TRIES} {task.name} items starts so")


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
        item = _draw_item(cfg, task, split, rng)
        if rng.random() < cfg.judge_fraction:
            if pool and rng.random() < cfg.draft_step_fraction:
                examples.append(judge_item_example(processor, rng.choice(pool).judge_item())[0])
            else:
                examples.append(judge_example(processor, item, rng)[0])
        else:
            examples.append(solution_example(processor, item))
    return collate(examples, processor.tokenizer.pad_token_id)


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


def _optimizer(cfg: TrainConfig, model: nn.Module, aux: AuxHeads) -> torch.optim.Optimizer:
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
        self, model: LlavaForConditionalGeneration, aux: AuxHeads, opt: torch.optim.Optimizer, rng: random.Random
    ) -> None:
        self.model, self.aux, self.opt, self.rng = model, aux, opt, rng

    def resume(self, ckpt: Path) -> int:
        """The steps done: restored from ``ckpt`` if a run saved one there, else 0."""
        if not (ckpt / "state.pt").exists():
            return 0
        state = load_checkpoint(ckpt / "state.pt")
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
    out, aux_loss, loss, _ = step_loss(run.model, run.aux, batch, cfg.aux_weight)
    if cfg.judge_weight > 0:
        loss = loss + cfg.judge_weight * verdict_loss(out.logits, batch.labels, verdict)
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
    digits = DigitTies(processor.tokenizer, cfg.shape.hidden) if cfg.digit_ties else None
    aux = AuxHeads(cfg.shape.hidden, task.cell_classes, digits)
    aux.attach(model, cfg.flag_layer, cfg.early_exit_layer)
    run = _Run(model, aux, _optimizer(cfg, model, aux), random.Random(cfg.seed))
    start = run.resume(ckpt) if resume else 0
    if start:
        log.info("resumed %s at step %d", cfg.name, start)
    model.train()
    verdict = verdict_ids(processor)
    pool, held_out = draft_pool(cfg.draft_steps)
    logf = open_append(out_dir / "log.jsonl")
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
            scores = evaluate(
                model,
                processor,
                aux,
                task,
                size=cfg.eval_size,
                judge=cfg.judge_fraction > 0,
                held_out=held_out,
                focus=cfg.focus_prefixes,
            )
            metrics = {"step": done, **scores}
            _write(logf, metrics)
            log.info("%s eval %s", cfg.name, metrics)
            aux.fold(model)
            save_pretrained_atomic(out_dir / f"step{done:05d}", model)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            run.save(ckpt, done)
    progress(cfg.steps)
    aux.fold(model)
    return save_pretrained_atomic(out_dir / "final", model, processor)


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
