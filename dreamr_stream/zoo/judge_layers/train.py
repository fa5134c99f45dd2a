"""Judge layers: a trained target learns TBVM's judge verdict from its own likelihood check.

The likelihood mode accepts a step when every one of its tokens is probable under the target
(``min_i p(token_i) >= tau / (1 + tau)``); that check is exact, and on the demo it agrees with
"the target would have written this step" on 99.9% of the drafts' steps. The judge mode asks
the same model for one ` yes` / ` no` after ``Check:``, and the demo target cannot answer: it
forms each next-token prediction only in its last layers, so none are left to compare a step's
tokens with those predictions and gather the comparisons at the verdict
(``benchmarks/results/judge_stage.md``).

So this stage appends decoder layers on top of the frozen target (``build.grow_decoder``, the
identity at the start) and trains only them, with labels the target itself gives:

* the verdict: the likelihood mode's decision on the same candidate, at the target's recommended
  likelihood tau (a distillation of the exact check into the judge prompt: no label noise, and
  the judge learns what FPSR needs, "would the target have written this");
* per candidate token, whether that token passes the check (an error flag after the new layer
  ``flag_after``), and after the next one whether every counted token so far passed (so the
  gathering is learned at every candidate position, not only at the verdict);
* at every position, the previous position's greedy token (after the first new layer: it
  teaches the copy the comparison needs);
* at every other position, the frozen target's next-token distribution (a KL term), so that the
  grown target writes what it wrote before.

The frozen layers compute the same thing at every step, so they run once: ``cache_trunk`` keeps
their last hidden states for every training item, and a training step runs only the new layers
(about 20x cheaper than a forward and backward through the whole target). ``JudgeLayers`` on a
cached trunk computes exactly what the grown model computes (``tests/test_judge_layers.py``).

New layers on top alone cannot flag a misread shape: the demo target's layer 17 replaces a written
shape with the one the image shows (``benchmarks/written_token_probe.py``). ``trainable_top``
trains the target's own top layers with the new ones, the trunk cached below them (the labels
and the KL still from the frozen target's last layer), so the written token can reach the check:
that is how the shipped ``target-judge`` was made.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.backends.hf import read_sidecar
from dreamr_stream.config import VerificationConfig
from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks.grid.puzzles import COLOURS, SHAPES, JudgeItem, Split, make_judge_item, make_puzzle, split_seed
from dreamr_stream.training import TrainingConfig, save_atomic, warmup_cosine
from dreamr_stream.zoo.build import grow_decoder
from dreamr_stream.zoo.data import IGNORE, judge_item_example, verdict_ids
from dreamr_stream.zoo.tbvm_eval import auroc
from dreamr_stream.zoo.train import draft_pool

__all__ = [
    "JudgeLayers",
    "JudgeLayersConfig",
    "Labels",
    "TrunkItem",
    "cache_trunk",
    "judge_items",
    "likelihood_labels",
    "likelihood_threshold",
    "swap_cell",
    "swap_word",
    "train",
]

log = logging.getLogger(__name__)


class JudgeLayersConfig(TrainingConfig):
    """A judge-layers stage (``zoo/configs/<name>.json``)."""

    name: str = Field(min_length=1)
    init_from: str  # the trained target (its layers stay frozen)
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


# --- items -------------------------------------------------------------------------------


def swap_word(item: JudgeItem, rng: random.Random, words: Sequence[str]) -> JudgeItem:
    """``item`` with one word of its candidate replaced: a digit of a number moved, a colour or a
    shape by another (a misread cell, one token), or else another word of the task's steps."""
    parts = item.candidate.split(" ")
    i = rng.randrange(len(parts))
    word = parts[i]
    digits = [j for j, ch in enumerate(word) if ch.isdigit()]
    if digits:
        j = rng.choice(digits)
        word = word[:j] + str((int(word[j]) + rng.randrange(1, 10)) % 10) + word[j + 1 :]
    else:
        word = _same_kind(word, rng) or rng.choice([w for w in words if w != word] or list(words))
    parts[i] = word
    return JudgeItem(item.puzzle, item.prefix, " ".join(parts), "swap")


# a cell's name in a row step: after "Row N: " or ", ", before its mark (" = "), ", " or ". "
_CELL = re.compile(rf"(?<=: |, )(?:empty|(?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)}))(?= =|,|\.)")


def swap_cell(item: JudgeItem, rng: random.Random) -> JudgeItem | None:
    """``item`` with one whole cell of its row step misread, "empty" for a coloured shape or a
    coloured shape for "empty" (marks and totals still follow the image), or None when its
    candidate names no cell. ``swap_word`` changes one attribute; this changes the cell."""
    cells = list(_CELL.finditer(item.candidate))
    if not cells:
        return None
    m = rng.choice(cells)
    new = "empty" if m.group() != "empty" else f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
    text = item.candidate
    return JudgeItem(item.puzzle, item.prefix, text[: m.start()] + new + text[m.end() :], "swap")


def _same_kind(word: str, rng: random.Random) -> str | None:
    """Another colour for a colour, another shape for a shape (plural and capital kept), else None."""
    core = word.rstrip(".,:")
    lower = core.lower()
    plural = lower.endswith("s") and lower[:-1] in SHAPES
    base = lower[:-1] if plural else lower
    for kind in (tuple(COLOURS), SHAPES):
        if base in kind:
            new = rng.choice([w for w in kind if w != base]) + ("s" if plural else "")
            return (new.capitalize() if core[:1].isupper() else new) + word[len(core) :]
    return None


def judge_items(
    split: Split, n: int, *, seed: int, swap_fraction: float, cell_swap_fraction: float = 0.0
) -> list[JudgeItem]:
    """``n`` judge-set items of ``split`` (half hard puzzles), ``swap_fraction`` of the correct
    ones with a swapped word (``swap_word``), ``cell_swap_fraction`` of those, where the step
    names cells, with a whole cell swapped instead (``swap_cell``)."""
    rng = random.Random(seed)
    words = sorted({w for i in range(200) for s in make_puzzle(split_seed(split, i)).steps() for w in s.split(" ")})
    items = []
    for _ in range(n):
        puzzle = make_puzzle(split_seed(split, rng.randrange(10**9)), hard=rng.random() < 0.5)
        item = make_judge_item(puzzle, rng)
        if item.correct and rng.random() < swap_fraction:
            whole = swap_cell(item, rng) if rng.random() < cell_swap_fraction else None
            item = whole or swap_word(item, rng, words)
        items.append(item)
    return items


# --- the frozen trunk, once ----------------------------------------------------------------


@dataclass
class TrunkItem:
    """A judge item through the frozen target: its tokens up to the judge suffix (the last
    position predicts the verdict), the trunk's output there (what the trained layers start from)
    and the frozen target's last layer output (its next-token distribution: the labels)."""

    ids: torch.Tensor  # (T,)
    hidden: torch.Tensor  # (T, hidden)
    top: torch.Tensor  # (T, hidden): ``hidden`` itself when no layer of the target trains
    start: int  # the candidate's first token
    n_text: int  # the candidate's text tokens: what the likelihood mode reads (not the delimiter)
    correct: bool
    kind: str


@torch.no_grad()
def cache_trunk(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    items: Sequence[JudgeItem],
    *,
    batch: int = 32,
    dtype: torch.dtype = torch.float16,
    below_top: int = 0,
) -> list[TrunkItem]:
    """Run ``model`` (the frozen target) once over every item, shortest first (little padding);
    keep the output of its layer ``below_top`` under the last and of its last layer in ``dtype``
    (fp16 halves a cache of tens of thousands of items)."""
    tok = processor.tokenizer
    kept: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Callable[[nn.Module, object, torch.Tensor | tuple[torch.Tensor, ...]], None]:
        def keep(_m: nn.Module, _i: object, out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
            kept[name] = out[0] if isinstance(out, tuple) else out

        return keep

    layers = model.model.language_model.layers
    hooks = [layers[-1 - below_top].register_forward_hook(keeper("h")), layers[-1].register_forward_hook(keeper("top"))]
    examples = []
    for item in items:
        ex, _ = judge_item_example(processor, item)
        start = next(i for i, f in enumerate(ex.flags or []) if f != IGNORE)
        n_text = len(tok(item.candidate, add_special_tokens=False)["input_ids"])
        examples.append((ex.input_ids[:-1], ex.pixel_values, start, n_text, item))  # the verdict token off
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out: list[TrunkItem | None] = [None] * len(examples)
    try:
        for b in range(0, len(order), batch):
            rows = order[b : b + batch]
            width = max(len(examples[i][0]) for i in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                seq = examples[i][0]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            model(input_ids=ids, attention_mask=mask, pixel_values=torch.stack([examples[i][1] for i in rows]))
            for r, i in enumerate(rows):
                length = int(mask[r].sum())
                _, _, start, n_text, item = examples[i]
                hidden = kept["h"][r, :length].to(dtype).clone()
                top = hidden if below_top == 0 else kept["top"][r, :length].to(dtype).clone()
                out[i] = TrunkItem(ids[r, :length].clone(), hidden, top, start, n_text, item.correct, item.corruption)
    finally:
        for hook in hooks:
            hook.remove()
    return [t for t in out if t is not None]


# --- the new layers on a cached trunk -----------------------------------------------------------


class JudgeLayers(nn.Module):
    """The grown target's layers from ``first_trained`` up (its new layers, and any of its own top
    layers that train with them), final norm and LM head over the frozen trunk's output, and the
    training-only heads (flag, gather, copy; not shipped), placed by the new layers' index."""

    norm: nn.Module
    lm_head: nn.Module

    def __init__(
        self, grown: LlavaForConditionalGeneration, first_new: int, flag_after: int, first_trained: int | None = None
    ) -> None:
        super().__init__()
        text = grown.model.language_model
        first_trained = first_new if first_trained is None else first_trained
        # shared with ``grown``: training them trains it
        self.layers = nn.ModuleList(text.layers[first_trained:])
        self.new_from = first_new - first_trained  # the first new layer's index in ``layers``
        self.rotary = text.rotary_emb
        # frozen and owned by ``grown``: kept outside the module tree so they are not saved twice
        object.__setattr__(self, "norm", text.norm)
        object.__setattr__(self, "lm_head", grown.lm_head)
        self.flag_after = flag_after
        hidden = text.config.hidden_size
        self.flag_head = nn.Linear(hidden, 1)
        self.gather_head = nn.Linear(hidden, 1)
        self.copy_head = nn.Linear(hidden, text.config.vocab_size)

    def forward(self, trunk: torch.Tensor) -> dict[str, torch.Tensor]:
        """``trunk``: right-padded frozen last-layer outputs (B, T, hidden). The logits (what the
        grown model outputs there) and the training-only heads' outputs."""
        positions = torch.arange(trunk.shape[1], device=trunk.device)[None].expand(trunk.shape[0], -1)
        rope = self.rotary(trunk, positions)
        h, out = trunk, {}
        for i, layer in enumerate(self.layers):
            # no mask: causal attention, and right padding never reaches an earlier position
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
            new = i - self.new_from
            if new == 0:
                out["copy"] = self.copy_head(h)
            if new == self.flag_after:
                out["flag"] = self.flag_head(h).squeeze(-1)
            if new == self.flag_after + 1:
                out["gather"] = self.gather_head(h).squeeze(-1)
        out["logits"] = self.lm_head(self.norm(h))
        return out

    @torch.no_grad()
    def frozen_logprobs(self, top: torch.Tensor) -> torch.Tensor:
        """The frozen target's next-token log-probabilities (its final norm and head on its last
        layer's output, ``Padded.top``)."""
        return torch.log_softmax(self.lm_head(self.norm(top)), dim=-1)


@dataclass
class Padded:
    trunk: torch.Tensor  # (B, T, hidden)
    top: torch.Tensor  # (B, T, hidden): the frozen target's last layer output
    ids: torch.Tensor  # (B, T)
    real: torch.Tensor  # (B, T) bool: not padding
    counted: torch.Tensor  # (B, T) bool: the candidate's text tokens
    after: torch.Tensor  # (B, T) bool: the candidate and the judge suffix
    last: torch.Tensor  # (B,): the position predicting the verdict


def pad(items: Sequence[TrunkItem]) -> Padded:
    width = max(len(t.ids) for t in items)
    b = len(items)
    p = Padded(
        trunk=torch.zeros((b, width, items[0].hidden.shape[1])),
        top=torch.zeros((b, width, items[0].hidden.shape[1])),
        ids=torch.zeros((b, width), dtype=torch.long),
        real=torch.zeros((b, width), dtype=torch.bool),
        counted=torch.zeros((b, width), dtype=torch.bool),
        after=torch.zeros((b, width), dtype=torch.bool),
        last=torch.tensor([len(t.ids) - 1 for t in items]),
    )
    for r, t in enumerate(items):
        n = len(t.ids)
        p.trunk[r, :n] = t.hidden.float()
        p.top[r, :n] = t.top.float()
        p.ids[r, :n] = t.ids
        p.real[r, :n] = True
        p.counted[r, t.start : t.start + t.n_text] = True
        p.after[r, t.start : n] = True
    return p


@dataclass
class Labels:
    """What the frozen target says about a padded batch."""

    logprobs: torch.Tensor  # (B, T, vocab): its next-token distribution at each position
    token_ok: torch.Tensor  # (B, T) bool: the token there has p >= threshold after the tokens before it
    so_far_ok: torch.Tensor  # (B, T) bool: every counted token up to here passes
    accept: torch.Tensor  # (B,) bool: the likelihood mode accepts the candidate


def likelihood_labels(logprobs: torch.Tensor, p: Padded, threshold: float) -> Labels:
    """The likelihood mode's check (``verify.LikelihoodVerifier`` with the ``min`` aggregate: the
    least probable text token against ``threshold = tau / (1 + tau)``), token by token."""
    token_p = torch.zeros(p.ids.shape)
    token_p[:, 1:] = logprobs[:, :-1].gather(2, p.ids[:, 1:, None]).squeeze(-1).exp()
    token_ok = token_p >= threshold
    failed = (~token_ok & p.counted).long().cumsum(1)
    return Labels(logprobs, token_ok, failed == 0, failed[:, -1] == 0)


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


# --- the stage ------------------------------------------------------------------------------


def likelihood_threshold(folder: Path, tau: float | None = None) -> float:
    """The per-token probability the likelihood mode needs at ``tau`` (default: the likelihood
    tau ``folder``'s ``dreamr.json`` recommends)."""
    if tau is None:
        recommended = read_sidecar(folder).get("verification", {})
        if recommended.get("mode") != "likelihood" and "likelihood" not in recommended.get("taus", {}):
            raise ConfigError(f"{folder} recommends no likelihood tau: set the config's tau")
        tau = VerificationConfig.recommended(recommended, mode="likelihood").tau
    return tau / (1.0 + tau)


def _datasets(
    cfg: JudgeLayersConfig, model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: Path
) -> tuple[list[TrunkItem], list[TrunkItem]]:
    """The cached trunk of the training and validation items (built once, kept in ``out``)."""
    path = out / "trunk.pt"
    if path.exists():
        cached = torch.load(path, weights_only=False)
        return cached["train"], cached["val"]
    train_items = judge_items(
        "train",
        cfg.judge_items,
        seed=cfg.seed,
        swap_fraction=cfg.swap_fraction,
        cell_swap_fraction=cfg.cell_swap_fraction,
    )
    val_items = judge_items("val", cfg.val_items, seed=cfg.seed + 1, swap_fraction=0.0)
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


def _start_layers(grown: LlavaForConditionalGeneration, first: int, folder: Path) -> None:
    """Copy ``folder``'s layers from ``first`` on into ``grown``'s (same depth)."""
    earlier = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    theirs, mine = earlier.model.language_model.layers, grown.model.language_model.layers
    if len(theirs) != len(mine):
        raise ConfigError(f"init_layers_from: {folder} has {len(theirs)} decoder layers, this stage {len(mine)}")
    for i in range(first, len(mine)):
        mine[i].load_state_dict(theirs[i].state_dict())


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
        _start_layers(grown, first_trained, Path(cfg.init_layers_from))
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
        state = torch.load(ckpt, weights_only=False)
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
    logf = (out / "log.jsonl").open("a")
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
    final = out / "final"
    grown.save_pretrained(final)
    processor.save_pretrained(final)
    return final


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
        state = torch.load(args.out / "checkpoint.pt", weights_only=False)
        cfg = cfg.model_copy(update={"steps": int(state["step"])})
    print(train(cfg, args.out))

