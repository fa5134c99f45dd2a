"""The charts task: read the printed values of a bar chart, then subtract, add, rank or count.

A chart (``chart``) has 3 to 6 lettered bars, vertical or horizontal, on a value axis with
gridlines; it is drawn (``render``) as 224 px, 8 x 8 cells of 28 px, so that each visual token of
models built for it sees one cell and every value and letter is inside one cell (the reasons are
``render``'s docstring). The questions ask for one bar's value, the difference of two bars, the
sum of the two largest, the median, or how many bars exceed a value; solutions (``solutions``)
read one bar per step with the running result beside it, then compute, then ``Answer: N``.
Judge items corrupt steps the way a weak chart reader errs (``judge``); ``off_task`` says what
lies outside the task.

``ChartsTask`` is the task seen through the ``Task`` seam, plus what the zoo's training pipeline
asks of a task (``zoo.task_needs``): hard items from any split's stream, the image's cells and
their classes, the words a step may swap.

Training its models (not done yet) needs, beside a training config naming ``"task": "charts"``:
a tokenizer of its own (the grid's 396 tokens lack ``Bar``, the letters, ``Largest``, ``Sorted``,
``Count``, ``Middle``, ``<``, ``>`` and numbers above the grid's counts; ``build_tokenizer`` on
this task makes 512, numbers up to about 105 single tokens, sums of the two largest up to 179);
models and a processor sized for 224 px (64 visual tokens and 65 positions, against the grid's
16: each example costs about 4x the grid's visual tokens); and, for the per-cell perception loss
over 100 classes (other, bar, 8 letters, values 1-90), class weights or separate tens and units
heads, since each value is rare. Solutions average 4.4 steps of 7.6 tokens on the test split
(6.2 steps on the hard split, 84 tokens at most): shorter steps than the grid's, so more
verifications per token.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from types import MappingProxyType

from PIL import Image

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks.base import JudgeItem, Split, TaskItem
from dreamr_stream.tasks.charts import judge, off_task, render, solutions
from dreamr_stream.tasks.charts.chart import LETTERS, Chart, make_chart, split_seed

__all__ = ["ChartsTask"]


class ChartsTask:
    """Reading bar charts, then a little arithmetic (``chart``, ``solutions``)."""

    name = "charts"
    title = "read a bar chart's values, then subtract, add, find the median or count"

    def item(self, split: Split, index: int) -> TaskItem:
        return self.mixed_item(split, index, hard=split == "hard")

    def parse_answer(self, text: str) -> int | None:
        return solutions.parse_answer(text)

    def off_task_warnings(self, image: Image.Image, question: str) -> list[str]:
        return off_task.off_task_warnings(image, question)

    def judge_item(self, item: TaskItem, rng: random.Random, p_correct: float = 0.5) -> JudgeItem:
        prefix, candidate, corruption = judge.make_judge_item(_chart(item), rng, p_correct)
        return JudgeItem(item, prefix, candidate, corruption)

    # --- what the zoo's training pipeline asks of a task (``zoo.task_needs``)

    # one cell per visual token of models built for the task (28 px patches): 8 x 8 cells
    image_size = render.IMAGE_SIZE
    cell_size = render.CELL
    # a cell's class for the per-cell perception loss: nothing read, a bar, a letter, a value
    cell_classes = render.CELL_CLASSES
    # the bars' letters, lower-case as the zoo's word swap compares words (a swapped capital
    # stays a capital): a misread letter is one of them written for another
    words: Mapping[str, tuple[str, ...]] = MappingProxyType({"letter": tuple(LETTERS.lower())})

    def mixed_item(self, split: Split, index: int, *, hard: bool) -> TaskItem:
        """Item ``index`` of ``split``'s seed stream, of the hard kind (more bars, longer axes, no
        plain reading) or not, whatever the split; its ``key`` names the stream position."""
        made = make_chart(split_seed(split, index), hard=hard)
        return TaskItem(
            task=self.name,
            split=split,
            index=index,
            image=render.render(made),
            question=made.question.text(),
            steps=tuple(solutions.steps(made)),
            answer=solutions.answer(made),
            source=made,
        )

    def cell_labels(self, item: TaskItem) -> list[int]:
        """Each cell's class (``cell_classes``), row by row: what the image shows there."""
        return render.cell_classes(_chart(item))

    def swap_cell(self, item: JudgeItem, rng: random.Random) -> JudgeItem | None:
        """``item`` with the value of its reading step misread (the running result still follows
        the image), or None when its candidate reads no bar."""
        m = _READ_VALUE.match(item.candidate)
        if m is None:
            return None
        wrong = judge.misread_value(rng, int(m.group(1)), _chart(item.item))
        text = item.candidate
        return JudgeItem(item.item, item.prefix, text[: m.start(1)] + str(wrong) + text[m.end(1) :], "swap")


# a reading step's value: after "Bar X: "
_READ_VALUE = re.compile(rf"Bar [{LETTERS}]: (\d+)")


def _chart(item: TaskItem) -> Chart:
    """The chart behind ``item``; a ConfigError for another task's item."""
    if not isinstance(item.source, Chart):
        raise ConfigError(f"the charts task was given another task's item ({item.key})")
    return item.source
