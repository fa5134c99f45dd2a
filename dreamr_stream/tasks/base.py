"""The Task seam: what a reasoning task gives the rest of the library.

A task is a family of (image, question) items with reference solutions in short steps, drawn
deterministically from a split and an index. Everything that needs puzzles (the bench, the
evaluation, the training pipeline, ``dreamr reason --random``, the demo page) asks a ``Task``
for them, so that a second task is one module plus its models: nothing else changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

__all__ = ["SPLITS", "JudgeItem", "Split", "Task", "TaskItem"]

Split = Literal["train", "val", "test", "hard"]
SPLITS: tuple[Split, ...] = ("train", "val", "test", "hard")


@dataclass(frozen=True)
class TaskItem:
    """One item of a task: ``task.item(split, index)``.

    ``steps`` is the reference solution, one step per entry (no delimiter inside), the last one
    final (``Answer: N``). ``source`` is the task's own value behind the item (the grid task's
    ``Puzzle``), for the task's own tools; the rest of the library reads only the fields.
    """

    task: str
    split: Split
    index: int
    image: Image.Image = field(repr=False, compare=False)
    question: str
    steps: tuple[str, ...]
    answer: int
    source: object = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        """A stable name for the item: ``grid/test/7``."""
        return f"{self.task}/{self.split}/{self.index}"


@dataclass(frozen=True)
class JudgeItem:
    """A (prefix, candidate) pair to judge: the reference step, or a corrupted version of it.

    ``corruption`` names how the candidate was made wrong (``none``: it is the reference step);
    the kinds are the task's own, except ``draft`` (a draft model's own wrong step) and ``swap``
    (one word of a correct step replaced), which the training pipeline makes for any task.
    """

    item: TaskItem
    prefix: list[str]
    candidate: str
    corruption: str

    @property
    def correct(self) -> bool:
        return self.corruption == "none"


@runtime_checkable
class Task(Protocol):
    """A reasoning task: items per split and index, answers, off-task hints, judge items."""

    @property
    def name(self) -> str:
        """Short id (``grid``): the name in ``dreamr.json``, ``--task`` and the demo page."""
        ...

    @property
    def title(self) -> str:
        """One line for a picker: what the task asks."""
        ...

    def item(self, split: Split, index: int) -> TaskItem:
        """Item ``index`` of ``split``: a pure function of both (splits never overlap)."""
        ...

    def parse_answer(self, text: str) -> int | None:
        """The answer written in ``text`` (a final step or a whole solution), or None."""
        ...

    def off_task_warnings(self, image: Image.Image, question: str) -> list[str]:
        """What in a request lies outside this task (its models answer anything confidently,
        so a caller should say so first); empty for an item of the task."""
        ...

    def judge_item(self, item: TaskItem, rng: random.Random, p_correct: float = 0.5) -> JudgeItem:
        """A judge item from ``item``: with probability ``p_correct`` a reference step, else one
        corrupted the way a weak reader would get it wrong."""
        ...
