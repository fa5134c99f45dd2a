"""The grid task (the demo task): count and compute over coloured shapes on a 4x4 grid.

The puzzles, their reference solutions and their corruptions are ``puzzles``; what lies
outside the task is ``off_task``; ``GridTask`` is the task seen through the ``Task`` seam, plus
what the zoo's training pipeline needs of it (``zoo.task_needs``: hard items from any split,
the image's cells and their labels, the words a step may swap).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from types import MappingProxyType

from PIL import Image

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks.base import JudgeItem, Split, TaskItem
from dreamr_stream.tasks.grid import off_task, puzzles

__all__ = ["GridTask"]


class GridTask:
    """Counting coloured shapes on a 4x4 grid, then a little arithmetic (``puzzles``)."""

    name = "grid"
    title = "count coloured shapes on a 4x4 grid, then add, subtract or count sides"

    def item(self, split: Split, index: int) -> TaskItem:
        puzzle = puzzles.make_puzzle(puzzles.split_seed(split, index), hard=split == "hard")
        return self._item(puzzle, split, index)

    def _item(self, puzzle: puzzles.Puzzle, split: Split, index: int) -> TaskItem:
        return TaskItem(
            task=self.name,
            split=split,
            index=index,
            image=puzzle.image,
            question=puzzle.question.text(),
            steps=tuple(puzzle.steps()),
            answer=puzzle.answer,
            source=puzzle,
        )

    def parse_answer(self, text: str) -> int | None:
        return puzzles.parse_answer(text)

    def off_task_warnings(self, image: Image.Image, question: str) -> list[str]:
        return off_task.off_task_warnings(image, question)

    def judge_item(self, item: TaskItem, rng: random.Random, p_correct: float = 0.5) -> JudgeItem:
        puzzle = item.source
        assert isinstance(puzzle, puzzles.Puzzle), "a grid judge item needs a grid task item"
        made = puzzles.make_judge_item(puzzle, rng, p_correct)
        return JudgeItem(item, made.prefix, made.candidate, made.corruption)

    # --- what the zoo's training pipeline needs (``zoo.task_needs``); the zoo imports none of
    # ``puzzles``, so the grid's sizes, cells and words reach it only through these

    # one shape per cell, and one visual token of the demo models per cell (28 px patches)
    image_size = puzzles.IMAGE_SIZE
    cell_size = puzzles.CELL
    # a cell's class for the per-cell perception loss: empty, or one (colour, shape) pair
    cell_classes = 1 + len(puzzles.COLOURS) * len(puzzles.SHAPES)
    # the words a step names a cell by, in groups whose words stand for each other (a misread
    # attribute is one word of a group written for another)
    words: Mapping[str, tuple[str, ...]] = MappingProxyType({"colour": tuple(puzzles.COLOURS), "shape": puzzles.SHAPES})

    def mixed_item(self, split: Split, index: int, *, hard: bool) -> TaskItem:
        """Item ``index`` of ``split``'s seed stream, of the hard kind (denser grids, two-target
        questions) or not, whatever the split: training mixes hard puzzles into every split, where
        ``item`` gives them only in ``hard``. Its ``key`` names the stream position, not the kind."""
        puzzle = puzzles.make_puzzle(puzzles.split_seed(split, index), hard=hard)
        return self._item(puzzle, split, index)

    def cell_labels(self, item: TaskItem) -> list[int]:
        """Each cell's class (``cell_classes``), row by row: what the image shows, for the zoo's
        per-cell perception loss on the visual tokens."""
        colours, shapes = list(puzzles.COLOURS), list(puzzles.SHAPES)
        return [
            0 if c is None else 1 + colours.index(c[0]) * len(shapes) + shapes.index(c[1])
            for row in _puzzle(item).grid
            for c in row
        ]

    def swap_cell(self, item: JudgeItem, rng: random.Random) -> JudgeItem | None:
        """``item`` with one whole cell of its row step misread, "empty" for a coloured shape or a
        coloured shape for "empty" (marks and totals still follow the image), or None when its
        candidate names no cell. A swapped word (``words``) changes one attribute; this the cell."""
        cells = list(_CELL.finditer(item.candidate))
        if not cells:
            return None
        m = rng.choice(cells)
        new = "empty" if m.group() != "empty" else f"{rng.choice(list(puzzles.COLOURS))} {rng.choice(puzzles.SHAPES)}"
        text = item.candidate
        return JudgeItem(item.item, item.prefix, text[: m.start()] + new + text[m.end() :], "swap")


# a cell's name in a row step: after "Row N: " or ", ", before its mark (" = "), ", " or ". "
_CELL = re.compile(rf"(?<=: |, )(?:empty|(?:{'|'.join(puzzles.COLOURS)}) (?:{'|'.join(puzzles.SHAPES)}))(?= =|,|\.)")


def _puzzle(item: TaskItem) -> puzzles.Puzzle:
    """The grid puzzle behind ``item``; a ConfigError for another task's item."""
    if not isinstance(item.source, puzzles.Puzzle):
        raise ConfigError(f"the grid task was given another task's item ({item.key})")
    return item.source
