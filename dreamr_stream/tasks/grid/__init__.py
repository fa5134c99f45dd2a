"""The grid task (the demo task): count and compute over coloured shapes on a 4x4 grid.

The puzzles, their reference solutions and their corruptions are ``puzzles``; what lies
outside the task is ``off_task``; ``GridTask`` is the task seen through the ``Task`` seam.
"""

from __future__ import annotations

import random

from PIL import Image

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
