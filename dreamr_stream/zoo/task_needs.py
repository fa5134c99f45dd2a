"""What the zoo's training pipeline needs of a task beyond the ``Task`` seam.

The bench, the evaluation and the demo page need only ``Task``. Building and training the demo
models needs more, and each need is a small Protocol that a task meets when it can (the grid task
meets all three; ``dreamr_stream.tasks`` never imports the zoo):

* ``MixedTask``: items of either kind, easy or hard, from any split's seed stream (training mixes
  a share of hard items into every split; ``Task.item`` gives them only in the ``hard`` split).
  A task with one kind of item gives that one (``draw``), so its training has no mix.
* ``PerceptionTask``: an image made of cells, one per visual token of the demo models (the image
  and cell size the models are built for) with a class each, for the per-cell perception loss
  that keeps colour and shape in the visual tokens. The demo models and their trainer require it.
* ``SwapTask``: the word groups a step may swap (colours, shapes: a misread attribute) and a
  whole-cell misreading, for the judge-layers stage's swapped items. Without it a swap replaces
  a word by another of the task's steps, and cell swaps are refused.

The rule for the zoo's code: what draws items takes a task (a config names it, default the grid);
what is handed items asks the items' own task (``task_of``: every ``TaskItem`` names its task).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import DEFAULT_TASK, JudgeItem, Split, Task, TaskItem, get_task

__all__ = [
    "MixedTask",
    "PerceptionTask",
    "SwapTask",
    "draw",
    "perception_task",
    "swap_task",
    "task_of",
]


@runtime_checkable
class MixedTask(Task, Protocol):
    """A task whose every split's seed stream yields hard items as well as ordinary ones."""

    def mixed_item(self, split: Split, index: int, *, hard: bool) -> TaskItem:
        """Item ``index`` of ``split``'s stream, of the hard kind or not, whatever the split."""
        ...


@runtime_checkable
class PerceptionTask(Task, Protocol):
    """A task whose image is a square of cells, one per visual token, each with a class."""

    @property
    def image_size(self) -> int:
        """The image's side in pixels."""
        ...

    @property
    def cell_size(self) -> int:
        """A cell's side in pixels: the demo models' patch size, so one visual token per cell."""
        ...

    @property
    def cell_classes(self) -> int:
        """How many classes a cell can have."""
        ...

    def cell_labels(self, item: TaskItem) -> list[int]:
        """Each cell's class in ``item``'s image, row by row."""
        ...


@runtime_checkable
class SwapTask(Task, Protocol):
    """A task whose steps name things by words that stand for each other, cell by cell."""

    @property
    def words(self) -> Mapping[str, tuple[str, ...]]:
        """Groups of words a misreading swaps for each other (a colour for a colour)."""
        ...

    def swap_cell(self, item: JudgeItem, rng: random.Random) -> JudgeItem | None:
        """``item`` with one whole cell of its candidate misread; None if it names no cell."""
        ...


def task_of(item: TaskItem) -> Task:
    """The task that made ``item`` (by the name it carries)."""
    return get_task(item.task)


def draw(task: Task, split: Split, index: int, *, hard: bool = False) -> TaskItem:
    """Item ``index`` of ``split``'s stream of ``task``, hard if asked and the task has hard items
    in every split (``MixedTask``); else the task's item there."""
    if isinstance(task, MixedTask):
        return task.mixed_item(split, index, hard=hard)
    return task.item(split, index)


def perception_task(task: Task | None, *, needed_by: str) -> PerceptionTask:
    """``task`` (default: the grid) as a ``PerceptionTask``; a ConfigError saying who needs it."""
    task = get_task(DEFAULT_TASK) if task is None else task
    if not isinstance(task, PerceptionTask):
        raise ConfigError(
            f"{needed_by} needs a task whose image is a grid of labelled cells (PerceptionTask); "
            f"task {task.name!r} is not one"
        )
    return task


def swap_task(task: Task, *, needed_by: str) -> SwapTask:
    """``task`` as a ``SwapTask``; a ConfigError saying who needs it."""
    if not isinstance(task, SwapTask):
        raise ConfigError(
            f"{needed_by} needs a task with swappable words and cells (SwapTask); task {task.name!r} has none"
        )
    return task
