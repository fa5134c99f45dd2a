"""Turn task items into training tensors, tokenised exactly as the backend feeds them.

The backend appends each step as ``tok(step) + tok("\\n")`` and verifies a candidate as
``tok(candidate) + tok("\\n") + tok(JUDGE_SUFFIX)`` -> verdict token; the training sequences
are built from the same pieces, so there is no train/serve tokenisation skew.

Items come from any task (``TaskItem``, ``JudgeItem``); an example's per-cell labels come from
the item's own task when it has them (``task_needs.PerceptionTask``), else there are none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from dreamr_stream.tasks import JudgeItem, TaskItem
from dreamr_stream.zoo.build import JUDGE_NEG, JUDGE_POS, JUDGE_SUFFIX
from dreamr_stream.zoo.task_needs import PerceptionTask, task_of

__all__ = [
    "IGNORE",
    "STEP_DELIMITER",
    "Batch",
    "Example",
    "cell_labels",
    "collate",
    "judge_example",
    "judge_item_example",
    "solution_example",
    "verdict_ids",
    "verdict_position",
]

STEP_DELIMITER = "\n"
IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (3, H, W)
    cells: list[int]  # one class per image cell, row-major (``cell_labels``; none: empty)
    # judge items: per position, whether the candidate so far is the reference so far (1/0), or
    # IGNORE; supervises an error flag at every token of the candidate (``TrainConfig.flag_weight``)
    flags: list[int] | None = None


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor  # (B, 3, H, W)
    cells: torch.Tensor  # (B, n_cells); (B, 0) for a task without cell labels
    flags: torch.Tensor  # (B, T), IGNORE where no flag is supervised


def cell_labels(item: TaskItem) -> list[int]:
    """Each image cell's class, row by row, from the item's task (a ``PerceptionTask``); none
    for a task without cells (its examples then carry no perception labels)."""
    task = task_of(item)
    return task.cell_labels(item) if isinstance(task, PerceptionTask) else []


class _Encoder:
    def __init__(self, processor: ProcessorMixin) -> None:
        self.processor = processor
        self.tok: PreTrainedTokenizerBase = processor.tokenizer  # type: ignore[attr-defined]

    @lru_cache(maxsize=65536)  # noqa: B019 - the encoder lives as long as its processor
    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt(self, item: TaskItem) -> tuple[list[int], torch.Tensor]:
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}
        ]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
        enc = self.processor(text=text, images=item.image, return_tensors="pt")
        return enc["input_ids"][0].tolist(), enc["pixel_values"][0]


_ENCODERS: dict[int, _Encoder] = {}


def _encoder(processor: ProcessorMixin) -> _Encoder:
    return _ENCODERS.setdefault(id(processor), _Encoder(processor))


def solution_example(processor: ProcessorMixin, item: TaskItem) -> Example:
    """``item``'s reference solution, every step trained (the last one ending in EOS)."""
    enc = _encoder(processor)
    prompt, pixels = enc.prompt(item)
    ids, labels = list(prompt), [IGNORE] * len(prompt)
    steps = item.steps
    for i, step in enumerate(steps):
        piece = list(enc.ids(step))
        piece += list(enc.ids(STEP_DELIMITER)) if i < len(steps) - 1 else [enc.tok.eos_token_id]
        ids += piece
        labels += piece
    return Example(ids, labels, pixels, cell_labels(item))


def verdict_ids(processor: ProcessorMixin) -> tuple[int, int]:
    """The token ids of the verdict words (`` yes``, `` no``), each a single token."""
    tok = processor.tokenizer  # type: ignore[attr-defined]
    pos, neg = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (JUDGE_POS, JUDGE_NEG))
    return pos, neg


def verdict_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row of a collated batch of judge items: the position whose logits predict the verdict
    (its last token, so the one before it; rows are right-padded)."""
    return attention_mask.sum(1) - 2


def judge_example(processor: ProcessorMixin, item: TaskItem, rng: random.Random) -> tuple[Example, bool]:
    """A judge-set item of ``item`` (its task's ``judge_item``) as a training example."""
    return judge_item_example(processor, task_of(item).judge_item(item, rng))


def judge_item_example(processor: ProcessorMixin, item: JudgeItem) -> tuple[Example, bool]:
    """Prefix steps (trained), candidate step (not trained), judge suffix, verdict (trained)."""
    enc = _encoder(processor)
    prompt, pixels = enc.prompt(item.item)
    ids, labels = list(prompt), [IGNORE] * len(prompt)
    newline = list(enc.ids(STEP_DELIMITER))
    for step in item.prefix:
        piece = list(enc.ids(step)) + newline
        ids += piece
        labels += piece
    candidate = list(enc.ids(item.candidate)) + newline
    reference = list(enc.ids(item.item.steps[len(item.prefix)])) + newline
    suffix = list(enc.ids(JUDGE_SUFFIX))
    flags = [IGNORE] * len(ids) + _on_track(candidate, reference) + [int(item.correct)] * len(suffix)
    ids += candidate + suffix
    labels += [IGNORE] * (len(candidate) + len(suffix))
    verdict = enc.ids(JUDGE_POS if item.correct else JUDGE_NEG)
    assert len(verdict) == 1, "verdict words must be single tokens"
    ids += list(verdict)
    labels += list(verdict)
    flags += [IGNORE]
    return Example(ids, labels, pixels, cell_labels(item.item), flags), item.correct


def _on_track(candidate: list[int], reference: list[int]) -> list[int]:
    """Per candidate token: 1 while the candidate so far is the reference so far, then 0; the
    last (the delimiter) is 1 iff the whole step is the reference."""
    out, same = [], True
    for i, token in enumerate(candidate):
        same = same and i < len(reference) and token == reference[i]
        out.append(int(same))
    out[-1] = int(candidate == reference)
    return out


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    flags = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        if e.flags is not None:
            flags[i, :n] = torch.tensor(e.flags)
        mask[i, :n] = 1
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        pixel_values=torch.stack([e.pixel_values for e in examples]),
        cells=torch.tensor([e.cells for e in examples], dtype=torch.long),
        flags=flags,
    )
