"""The judge-layers stage's data: judge-set items of a task with swapped words or cells, and the
labels the frozen target gives them (the likelihood mode's own decisions, token by token).

The swaps read the task's word groups and cells (``task_needs.SwapTask``; the grid's colours,
shapes and row steps) from the item's own task, so nothing here knows the grid's words."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamr_stream.backends.settings import read_settings
from dreamr_stream.config import VerificationConfig
from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import JudgeItem, Split, Task, get_task
from dreamr_stream.zoo.judge_layers.model import Padded
from dreamr_stream.zoo.task_needs import SwapTask, draw, swap_task, task_of

__all__ = ["Labels", "judge_items", "likelihood_labels", "likelihood_threshold", "swap_cell", "swap_word"]


def swap_word(item: JudgeItem, rng: random.Random, words: Sequence[str]) -> JudgeItem:
    """``item`` with one word of its candidate replaced: a digit of a number moved, a word of one of
    its task's word groups by another of the group (a colour or a shape: a misread cell, one
    token; ``task_needs.SwapTask.words``), or else another of ``words`` (the task's steps' words)."""
    task = task_of(item.item)
    groups = tuple(task.words.values()) if isinstance(task, SwapTask) else ()
    parts = item.candidate.split(" ")
    i = rng.randrange(len(parts))
    word = parts[i]
    digits = [j for j, ch in enumerate(word) if ch.isdigit()]
    if digits:
        j = rng.choice(digits)
        word = word[:j] + str((int(word[j]) + rng.randrange(1, 10)) % 10) + word[j + 1 :]
    else:
        word = _same_kind(word, rng, groups) or rng.choice([w for w in words if w != word] or list(words))
    parts[i] = word
    return JudgeItem(item.item, item.prefix, " ".join(parts), "swap")


def swap_cell(item: JudgeItem, rng: random.Random) -> JudgeItem | None:
    """``item`` with one whole cell of its step misread (its task's ``swap_cell``: the grid's
    names "empty" for a coloured shape or a coloured shape for "empty", marks and totals still
    following the image), or None when its candidate names no cell. ``swap_word`` changes one
    attribute; this changes the cell. A ConfigError for a task without cells to swap."""
    return swap_task(task_of(item.item), needed_by="a cell swap").swap_cell(item, rng)


def _same_kind(word: str, rng: random.Random, groups: Sequence[tuple[str, ...]]) -> str | None:
    """Another word of ``word``'s group (a colour for a colour; plural and capital kept), else None."""
    core = word.rstrip(".,:")
    lower = core.lower()
    for group in groups:
        plural = lower not in group and lower.endswith("s") and lower[:-1] in group
        if lower in group or plural:
            base = lower[:-1] if plural else lower
            new = rng.choice([w for w in group if w != base]) + ("s" if plural else "")
            return (new.capitalize() if core[:1].isupper() else new) + word[len(core) :]
    return None


def judge_items(
    split: Split,
    n: int,
    *,
    seed: int,
    swap_fraction: float,
    cell_swap_fraction: float = 0.0,
    task: Task | None = None,
) -> list[JudgeItem]:
    """``n`` judge-set items of ``split`` of ``task`` (default: the grid; half of them hard where the
    task has hard items, ``task_needs.draw``), ``swap_fraction`` of the correct ones with a
    swapped word (``swap_word``), ``cell_swap_fraction`` of those, where the step names cells,
    with a whole cell swapped instead (``swap_cell``: the task must have cells to swap)."""
    task = get_task() if task is None else task
    if cell_swap_fraction > 0:
        swap_task(task, needed_by="cell_swap_fraction > 0")  # refused before any item is made
    rng = random.Random(seed)
    words = sorted({w for i in range(200) for s in draw(task, split, i).steps for w in s.split(" ")})
    items = []
    for _ in range(n):
        item = task.judge_item(draw(task, split, rng.randrange(10**9), hard=rng.random() < 0.5), rng)
        if item.correct and rng.random() < swap_fraction:
            whole = swap_cell(item, rng) if rng.random() < cell_swap_fraction else None
            item = whole or swap_word(item, rng, words)
        items.append(item)
    return items


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


def likelihood_threshold(folder: Path, tau: float | None = None) -> float:
    """The per-token probability the likelihood mode needs at ``tau`` (default: the likelihood
    tau ``folder``'s ``dreamr.json`` recommends)."""
    if tau is None:
        recommended = read_settings(folder).verification
        if recommended.get("mode") != "likelihood" and "likelihood" not in recommended.get("taus", {}):
            raise ConfigError(f"{folder} recommends no likelihood tau: set the config's tau")
        tau = VerificationConfig.recommended(recommended, mode="likelihood").tau
    return tau / (1.0 + tau)
