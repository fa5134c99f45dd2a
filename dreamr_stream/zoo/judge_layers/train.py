"""The judge-layers stage itself: its config file, the losses and the validation metrics on the
cached trunk, the training loop with its checkpoints, and ``dreamr zoo judge-layers``."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.errors import ConfigError
from dreamr_stream.jsonl import open_append
from dreamr_stream.tasks import DEFAULT_TASK, get_task
from dreamr_stream.training import TrainingConfig, load_checkpoint, save_atomic, save_pretrained_atomic, warmup_cosine
from dreamr_stream.zoo.build import grow_decoder
from dreamr_stream.zoo.data import verdict_ids
from dreamr_stream.zoo.judge_layers.data import Labels, judge_items, likelihood_labels, likelihood_threshold
from dreamr_stream.zoo.judge_layers.model import JudgeLayers, Padded, TrunkItem, cache_trunk, pad, start_layers
from dreamr_stream.zoo.tbvm_eval import auroc
from dreamr_stream.zoo.train import draft_pool

__all__ = ["JudgeLayersConfig", "evaluate", "losses", "main", "train"]

log = logging.getLogger(__name__)


class JudgeLayersConfig(TrainingConfig):
    """A judge-layers stage (``zoo/configs/<name>.json``)."""

    name: str = Field(min_length=1)
    init_from: str  # the trained target (its layers stay frozen)
    task: str = DEFAULT_TASK  # whose judge items it trains on (``tasks.get_task``)
    # a grown target (an earlier stage's ``final``) whose new layers start this stage's
    init_layers_from: str | None = None
    new_layers: int = Field(default=4, ge=3)  # flag, gather, verdict: at least three
    flag_after: int = Field(default=1, ge=0)  # the new layer whose output carries the per-token flag
    # the target's own top layers that train with the new ones (KL keeps what they write): the
    # trunk is cached below them. Its top layers overwrite a written token with what the image
    # shows (a misread shape is unreadable above layer 16 of 24, judge_stage.md), so new layers
    # on top alone cannot see a misread; trained top layers can keep the written token.
    trainable_top: int = Field(default=0, ge=0)
    # the likelihood tau whose decisions the verdict learns (default: what init_from recommends)
    tau: float | None = Field(default=None, gt=0.0)
    steps: int = Field(default=3000, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    warmup: int = Field(default=50, ge=0)
    min_lr_frac: float = Field(default=0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    kl_weight: float = Field(default=1.0, ge=0.0)
    verdict_weight: float = Field(default=1.0, ge=0.0)
    flag_weight: float = Field(default=1.0, ge=0.0)
    gather_weight: float = Field(default=1.0, ge=0.0)
    copy_weight: float = Field(default=0.5, ge=0.0)
    # training items: judge-set items of the train split, a share of the correct ones with one
    # word or digit swapped (more wrong tokens, each alone in its step), and the drafts' own steps
    judge_items: int = Field(default=16000, ge=1)
    swap_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    cell_swap_fraction: float = Field(default=0.0, ge=0.0, le=1.0)  # of the swaps: a whole cell
    draft_steps: str | None = None
    val_items: int = Field(default=600, ge=1)
    seed: int = 7
    threads: int = Field(default=1, ge=1)
    eval_every: int = Field(default=250, ge=1)
    extra: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _layers_exist(self) -> JudgeLayersConfig:
        if self.flag_after + 2 >= self.new_layers:
            raise ValueError(
                f"flag_after {self.flag_after}: the gather (flag_after + 1) and the verdict need new layers "
                f"after it, and there are {self.new_layers}"
            )
        return self


def losses(
    judge: JudgeLayers, p: Padded, threshold: float, verdict: tuple[int, int]
) -> tuple[dict[str, torch.Tensor], Labels, dict[str, torch.Tensor]]:
    """Each loss term of one batch, the labels and the model's outputs."""
    out = judge(p.trunk)
    labels = likelihood_labels(judge.frozen_logprobs(p.top), p, threshold)
    rows = torch.arange(len(p.last))
    keep = p.real.clone()
    keep[rows, p.last] = False  # the verdict position learns the verdict instead
    new = torch.log_softmax(out["logits"], dim=-1)
    frozen = labels.logprobs
    kl = (frozen.exp() * (frozen - new)).sum(-1)[keep].mean()
    yes, no = verdict
    gold = torch.where(labels.accept, torch.tensor(yes), torch.tensor(no))
    verdict_loss = nn.functional.cross_entropy(out["logits"][rows, p.last], gold)
    bce = nn.functional.binary_cross_entropy_with_logits
    flag = bce(out["flag"][p.counted], labels.token_ok[p.counted].float())
    gather = bce(out["gather"][p.after], labels.so_far_ok[p.after].float())
    copy_where = p.real[:, 1:]
    copy = nn.functional.cross_entropy(out["copy"][:, 1:][copy_where], frozen.argmax(-1)[:, :-1][copy_where])
    return {"kl": kl, "verdict": verdict_loss, "flag": flag, "gather": gather, "copy": copy}, labels, out


@torch.no_grad()
def evaluate(
    judge: JudgeLayers, items: Sequence[TrunkItem], threshold: float, verdict: tuple[int, int]
) -> dict[str, Any]:
    """The verdict (` yes` above ` no`) against the likelihood mode and against the items'
    truth, the flag's AUROC, and how often the grown model keeps the frozen one's greedy token."""
    judge.eval()
    yes, no = verdict
    said, accept, correct, kinds = [], [], [], []
    flags, token_ok = [], []
    same = total = 0
    for b in range(0, len(items), 64):
        chunk = items[b : b + 64]
        p = pad(chunk)
        out = judge(p.trunk)
        labels = likelihood_labels(judge.frozen_logprobs(p.top), p, threshold)
        rows = torch.arange(len(chunk))
        v = out["logits"][rows, p.last]
        said.append(v[:, yes] > v[:, no])
        accept.append(labels.accept)
        correct.append(torch.tensor([t.correct for t in chunk]))
        kinds += [t.kind for t in chunk]
        flags.append(out["flag"][p.counted])
        token_ok.append(labels.token_ok[p.counted])
        steps = p.after.clone()
        steps[rows, p.last] = False
        same += int((out["logits"].argmax(-1) == labels.logprobs.argmax(-1))[steps].sum())
        total += int(steps.sum())
    judge.train()
    s, a, c = torch.cat(said), torch.cat(accept), torch.cat(correct)
    by_kind: dict[str, list[bool]] = {}
    for kind, yes_ in zip(kinds, s.tolist(), strict=True):
        by_kind.setdefault(kind, []).append(yes_)
    return {
        "verdict_vs_likelihood": float((s == a).float().mean()),
        "verdict_vs_truth": float((s == c).float().mean()),
        "accepts_correct": float(s[c].float().mean()) if bool(c.any()) else float("nan"),
        "accepts_wrong": float(s[~c].float().mean()) if bool((~c).any()) else float("nan"),
        "flag_auroc": auroc(torch.cat(flags), torch.cat(token_ok)),
        "same_greedy_token": same / max(1, total),
        "yes_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
    }


def _datasets(
    cfg: JudgeLayersConfig, model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path
) -> tuple[list[TrunkItem], list[TrunkItem]]:
    """The cached trunk of the training and validation items (built once, kept in ``out``)."""
    path = out / "trunk.pt"
    if path.exists():
        cached = load_checkpoint(path, allow=[TrunkItem])
        return cached["train"], cached["val"]
    task = get_task(cfg.task)
    train_items = judge_items(
        "train",
        cfg.judge_items,
        seed=cfg.seed,
        swap_fraction=cfg.swap_fraction,
        cell_swap_fraction=cfg.cell_swap_fraction,
        task=task,
    )
    val_items = judge_items("val", cfg.val_items, seed=cfg.seed + 1, swap_fraction=0.0, task=task)
    pool, held_out = draft_pool(cfg.draft_steps)
    train_items += [s.judge_item() for s in pool]
    val_items += [s.judge_item() for s in held_out]
    log.info("caching the frozen trunk over %d + %d items", len(train_items), len(val_items))
    below = cfg.trainable_top
    cached = {
        "train": cache_trunk(model, processor, train_items, below_top=below),
        "val": cache_trunk(model, processor, val_items, below_top=below),
    }
    save_atomic(cached, path)
    return cached["train"], cached["val"]


def _write(logf: IO[str], rec: dict[str, Any]) -> None:
    logf.write(json.dumps(rec) + "\n")
    logf.flush()


def train(cfg: JudgeLayersConfig, out: Path) -> Path:
    """Run (or resume) the stage; return the folder of the grown target (fp32, with processor)."""
    torch.set_num_threads(cfg.threads)
    threshold = likelihood_threshold(Path(cfg.init_from), cfg.tau)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    processor = LlavaProcessor.from_pretrained(cfg.init_from)
    grown = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
    grown.eval()
    depth = len(grown.model.language_model.layers)
    if cfg.trainable_top >= depth:  # before caching, which would index a layer that is not there
        raise ConfigError(f"trainable_top {cfg.trainable_top}: {cfg.init_from} has {depth} layers")
    train_set, val_set = _datasets(cfg, grown, processor, out)
    first_new = grow_decoder(grown, depth + cfg.new_layers, cfg.seed)
    first_trained = first_new - cfg.trainable_top
    if cfg.init_layers_from is not None:
        start_layers(grown, first_trained, Path(cfg.init_layers_from))
    for param in grown.parameters():
        param.requires_grad_(False)
    judge = JudgeLayers(grown, first_new, cfg.flag_after, first_trained)
    for param in judge.layers.parameters():
        param.requires_grad_(True)
    judge.train()
    trainable = [q for q in judge.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    ckpt = out / "checkpoint.pt"
    start = 0
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        judge.load_state_dict(state["judge"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        start = int(state["step"])
        log.info("resumed %s at step %d", cfg.name, start)
    verdict = verdict_ids(processor)
    weights = {
        "kl": cfg.kl_weight,
        "verdict": cfg.verdict_weight,
        "flag": cfg.flag_weight,
        "gather": cfg.gather_weight,
        "copy": cfg.copy_weight,
    }
    logf = open_append(out / "log.jsonl")
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        lr = warmup_cosine(step, peak=cfg.lr, warmup=cfg.warmup, start=cfg.warmup, end=cfg.steps, floor=cfg.min_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        terms, _, _ = losses(judge, pad(rng.sample(train_set, cfg.batch_size)), threshold, verdict)
        loss = sum((weights[k] * v for k, v in terms.items()), torch.zeros(()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        done = step + 1
        if done % 25 == 0:
            rec = {k: round(float(v.detach()), 5) for k, v in terms.items()}
            _write(logf, {"step": done, **rec, "lr": lr, "s_per_step": (time.perf_counter() - t0) / 25})
            t0 = time.perf_counter()
        if done % cfg.eval_every == 0 or done == cfg.steps:
            metrics = evaluate(judge, val_set, threshold, verdict)
            _write(logf, {"step": done, **metrics})
            log.info("%s step %d %s", cfg.name, done, metrics)
            state = {"judge": judge.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(), "step": done}
            save_atomic(state, ckpt)
    return save_pretrained_atomic(out / "final", grown, processor)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Teach a trained target the judge verdict in new top layers.")
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--save-only", action="store_true", help="write <out>/final from the last checkpoint, training nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    cfg = JudgeLayersConfig.from_json(args.config)
    if args.steps is not None:
        cfg = cfg.model_copy(update={"steps": args.steps})
    if args.save_only:
        state = load_checkpoint(args.out / "checkpoint.pt")
        cfg = cfg.model_copy(update={"steps": int(state["step"])})
    print(train(cfg, args.out))
