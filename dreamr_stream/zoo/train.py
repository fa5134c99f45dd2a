"""Supervised training of the demo target and SFT draft from scratch, on CPU.

Recipe (why, in the model cards): solutions as short per-row steps; the target also learns to
judge steps (a share of items end in ``Check:`` -> `` yes``/`` no`` after a correct or corrupted
candidate); an auxiliary per-cell classification loss on the projected visual tokens keeps
colour and shape in the image tokens (without it the language model learns an "occupied"
shortcut and training washes shape out of the vision tower); the vision tower trains at a
lower learning rate; cosine schedule with a floor so late steps still learn.

Resumable: ``<out>/checkpoint`` holds model, optimiser and data-stream state every
``ckpt_every`` steps; ``<out>/log.jsonl`` one line per log/eval event.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.zoo.build import JUDGE_NEG, JUDGE_POS, ModelShape, build_model, build_processor, build_tokenizer
from dreamr_stream.zoo.data import IGNORE, N_CELL_CLASSES, Batch, collate, judge_example, solution_example
from dreamr_stream.zoo.task import make_puzzle, split_seed

__all__ = ["TrainConfig", "load_or_build_processor", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    name: str
    shape: ModelShape
    seed: int = 0
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1.5e-3
    vision_lr_mult: float = 0.3
    warmup: int = 80
    min_lr_frac: float = 0.15
    weight_decay: float = 0.01
    judge_fraction: float = 0.0
    hard_fraction: float = 0.15
    aux_weight: float = 0.5
    judge_weight: float = 0.0  # extra loss on verdict tokens (one token per judge item is a faint signal)
    eval_every: int = 100
    ckpt_every: int = 50
    eval_size: int = 48
    threads: int = 2
    # A model folder to start from instead of random weights: a later stage of a recipe (for
    # example solutions only at a low constant learning rate once perception has converged).
    init_from: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        raw = json.loads(path.read_text())
        raw["shape"] = ModelShape(**raw["shape"])
        return cls(**raw)


def load_or_build_processor(folder: Path) -> LlavaProcessor:
    if (folder / "processor_config.json").exists():
        return LlavaProcessor.from_pretrained(folder)
    processor = build_processor(build_tokenizer())
    processor.save_pretrained(folder)
    return processor


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class _AuxCells(nn.Module):
    """Per-cell classifier on the projected visual tokens (training only, not shipped)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, N_CELL_CLASSES)
        self.features: torch.Tensor | None = None

    def hook(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self.features = output  # (B, n_cells, hidden)


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


def _make_batch(cfg: TrainConfig, processor: LlavaProcessor, rng: random.Random, split: str = "train") -> Batch:
    examples = []
    for _ in range(cfg.batch_size):
        puzzle = make_puzzle(split_seed(split, rng.randrange(10**9)), hard=rng.random() < cfg.hard_fraction)  # type: ignore[arg-type]
        if rng.random() < cfg.judge_fraction:
            examples.append(judge_example(processor, puzzle, rng)[0])
        else:
            examples.append(solution_example(processor, puzzle))
    return collate(examples, processor.tokenizer.pad_token_id)


def _step_loss(model: LlavaForConditionalGeneration, aux: _AuxCells, batch: Batch, aux_weight: float):
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


def _verdict_loss(logits: torch.Tensor, labels: torch.Tensor, verdict_ids: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy on the verdict token of judge items (rows whose last label is a verdict)."""
    last = (labels != IGNORE).long().cumsum(1).argmax(1)  # index of the last supervised token, (B,)
    rows = torch.arange(labels.shape[0])
    gold = labels[rows, last]
    is_judge = (gold == verdict_ids[0]) | (gold == verdict_ids[1])
    if not bool(is_judge.any()):
        return logits.sum() * 0.0
    pred = logits[rows, last - 1]  # logits at t predict token t+1: (B, vocab)
    return nn.functional.cross_entropy(pred[is_judge], gold[is_judge])


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, cfg: TrainConfig, aux: _AuxCells
) -> dict[str, float]:
    """Teacher-forced metrics on fixed validation items: token and whole-step accuracy, judge accuracy."""
    model.eval()
    rng = random.Random(1234)
    tok = processor.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    puzzles = [make_puzzle(split_seed("val", i)) for i in range(cfg.eval_size)]
    batch = collate([solution_example(processor, p) for p in puzzles], tok.pad_token_id)
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
        pos, neg = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (JUDGE_POS, JUDGE_NEG))
        items = [judge_example(processor, p, rng) for p in puzzles]
        jb = collate([e for e, _ in items], tok.pad_token_id)
        logits = model(input_ids=jb.input_ids, attention_mask=jb.attention_mask, pixel_values=jb.pixel_values).logits
        last = jb.attention_mask.sum(1) - 2  # position predicting the verdict token
        verdict_logits = logits[torch.arange(len(items)), last]
        said_yes = verdict_logits[:, pos] > verdict_logits[:, neg]
        truth = torch.tensor([c for _, c in items])
        metrics["val_judge_acc"] = float((said_yes == truth).float().mean())
    model.train()
    return metrics


def train(cfg: TrainConfig, out_dir: Path, processor_dir: Path, resume: bool = True) -> Path:
    """Train (or resume) and return the folder of the final model (fp32, ``save_pretrained``)."""
    torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    processor = load_or_build_processor(processor_dir)
    ckpt = out_dir / "checkpoint"
    if cfg.init_from is not None:
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
    else:
        model = build_model(processor.tokenizer, cfg.shape, cfg.seed)
    aux = _AuxCells(cfg.shape.hidden)
    model.model.multi_modal_projector.register_forward_hook(aux.hook)
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n]
    others = [p for n, p in model.named_parameters() if "vision_tower" not in n] + list(aux.parameters())
    groups = [{"params": others, "lr_mult": 1.0}, {"params": vision, "lr_mult": cfg.vision_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    start = 0
    if resume and (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        log.info("resumed %s at step %d", cfg.name, start)
    model.train()
    tok = processor.tokenizer
    verdict_ids = (
        tok(JUDGE_POS, add_special_tokens=False)["input_ids"][0],
        tok(JUDGE_NEG, add_special_tokens=False)["input_ids"][0],
    )
    logf = (out_dir / "log.jsonl").open("a")
    t0 = time.perf_counter()
    progress = _progress(cfg.name, start, cfg.steps)
    for step in range(start, cfg.steps):
        progress(step)
        lr = _lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        batch = _make_batch(cfg, processor, rng)
        out, aux_loss, loss, _ = _step_loss(model, aux, batch, cfg.aux_weight)
        if cfg.judge_weight > 0:
            loss = loss + cfg.judge_weight * _verdict_loss(out.logits, batch.labels, verdict_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        done = step + 1
        if done % 10 == 0:
            rec = {
                "step": done,
                "loss": float(out.loss.detach()),
                "aux": float(aux_loss.detach()),
                "lr": lr,
                "gnorm": gnorm,
                "s_per_step": (time.perf_counter() - t0) / 10,
            }
            t0 = time.perf_counter()
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log.info("%s step %d loss %.4f aux %.4f lr %.2e", cfg.name, done, rec["loss"], rec["aux"], lr)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            metrics = {"step": done, **evaluate(model, processor, cfg, aux)}
            logf.write(json.dumps(metrics) + "\n")
            logf.flush()
            log.info("%s eval %s", cfg.name, metrics)
            model.save_pretrained(out_dir / f"step{done:05d}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            ckpt.mkdir(exist_ok=True)
            tmp = ckpt / "state.pt.tmp"
            torch.save(
                {
                    "model": model.state_dict(),
                    "aux": aux.state_dict(),
                    "opt": opt.state_dict(),
                    "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "step": done,
                },
                tmp,
            )
            tmp.replace(ckpt / "state.pt")  # atomic: a stop mid-save never corrupts the checkpoint
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
        cfg.steps = args.steps
    train(cfg, args.out, args.processor, resume=not args.no_resume)


if __name__ == "__main__":
    main()
