"""The charts task's charts: bars, their values and the question, a pure function of a seed.

A chart has 3 to 6 bars (5 or 6 in the hard split), each named by a capital letter (``LETTERS``,
in alphabetical order along the category axis) and holding a distinct whole value between a tenth
of the axis and its top. The value axis spans six cells with a labelled gridline per cell worth
``tick`` (2, 4, 5, 10 or 15: axes topping out at 12 to 90, so every value has at most two digits).
Distinct values keep every question single-answered: one median, one pair of largest bars, and
no bar exactly at the threshold. How it is drawn, and why, is ``render``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks.base import Split

__all__ = [
    "AXIS_CELLS",
    "EASY_TICKS",
    "HARD_TICKS",
    "KINDS",
    "LETTERS",
    "MAX_VALUE",
    "PALETTE",
    "SLOTS",
    "Chart",
    "Kind",
    "Question",
    "make_chart",
    "split_seed",
]

LETTERS = "ABCDEFGH"
SLOTS = 7  # places for bars along the category axis (bars sit in consecutive ones)
AXIS_CELLS = 6  # the value axis is six cells long, a labelled gridline at every cell
EASY_TICKS = (2, 4, 5, 10)  # what one cell of the value axis is worth: axes to 12, 24, 30, 60
HARD_TICKS = (5, 10, 15)  # axes to 30, 60, 90: two-digit values and sums
MAX_VALUE = AXIS_CELLS * max(*EASY_TICKS, *HARD_TICKS)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "orange": (240, 135, 25),
    "yellow": (225, 190, 20),
    "green": (45, 160, 65),
    "teal": (20, 150, 150),
    "blue": (45, 85, 225),
    "purple": (140, 65, 190),
    "grey": (115, 115, 115),
}

Kind = Literal["value", "diff", "top_two", "median", "above"]
KINDS: tuple[Kind, ...] = ("value", "diff", "top_two", "median", "above")
# seeds of the splits' streams: 10**9 items each, far from one another (and from the grid's)
_SPLIT_OFFSET: dict[str, int] = {"train": 5 * 10**9, "val": 6 * 10**9, "test": 7 * 10**9, "hard": 8 * 10**9}
_SPLIT_SIZE = 10**9


@dataclass(frozen=True)
class Question:
    """What is asked: ``bars`` names the bars read (value: one; diff: two, the larger first);
    ``threshold`` is the value to exceed (above)."""

    kind: Kind
    bars: tuple[str, ...] = ()
    threshold: int = 0

    def text(self) -> str:
        if self.kind == "value":
            return f"What is the value of bar {self.bars[0]}?"
        if self.kind == "diff":
            return f"How much greater is bar {self.bars[0]} than bar {self.bars[1]}?"
        if self.kind == "top_two":
            return "What is the sum of the two largest values?"
        if self.kind == "median":
            return "What is the median value of the bars?"
        return f"How many bars have a value above {self.threshold}?"


@dataclass(frozen=True)
class Chart:
    """One chart and its question. ``labels`` and ``values`` are in reading order: left to right
    (vertical bars) or top to bottom (horizontal bars); the rest says how it is drawn."""

    seed: int
    labels: tuple[str, ...]
    values: tuple[int, ...]
    question: Question
    horizontal: bool
    tick: int  # the value of one cell along the value axis
    first_slot: int  # the slot of the first bar (``SLOTS``)
    bar_width: int  # pixels across a bar, the same for every bar of a chart
    colours: tuple[str, ...]  # each bar's colour (``PALETTE``): one for all, or one each
    jitter_seed: int

    @property
    def axis_max(self) -> int:
        return AXIS_CELLS * self.tick

    def value_of(self, label: str) -> int:
        return self.values[self.labels.index(label)]


def split_seed(split: Split, index: int) -> int:
    """Disjoint seed streams per split: item ``index`` of ``split``."""
    if not 0 <= index < _SPLIT_SIZE:
        raise ConfigError(f"a charts item index is in [0, {_SPLIT_SIZE}), not {index}")
    return _SPLIT_OFFSET[split] + index


def _question(rng: random.Random, labels: tuple[str, ...], values: tuple[int, ...], tick: int, hard: bool) -> Question:
    kinds: list[Kind] = ["diff", "top_two", "median", "above"] if hard else list(KINDS)
    if len(values) % 2 == 0:
        kinds.remove("median")  # a median bar needs an odd number of bars
    kind = rng.choice(kinds)
    if kind == "value":
        return Question("value", (rng.choice(labels),))
    if kind == "diff":
        a, b = sorted(rng.sample(range(len(values)), 2), key=lambda i: -values[i])
        return Question("diff", (labels[a], labels[b]))
    if kind == "above":
        top = AXIS_CELLS * tick
        # ordinary charts ask about a labelled gridline; hard ones about any value between the bars
        options = range(tick, top, tick) if not hard else range(min(values) + 1, max(values))
        choices = [t for t in options if t not in values] or [t for t in range(1, top) if t not in values]
        return Question("above", threshold=rng.choice(choices))
    return Question(kind)


def make_chart(seed: int, *, hard: bool = False) -> Chart:
    """The chart of ``seed``; ``hard`` charts have more bars, longer axes and no plain reading."""
    rng = random.Random(seed)
    n = rng.choice((5, 6)) if hard else rng.choices((3, 4, 5, 6), weights=(3, 3, 2, 1))[0]
    tick = rng.choice(HARD_TICKS if hard else EASY_TICKS)
    top = AXIS_CELLS * tick
    values = tuple(rng.sample(range(max(1, top // 10), top + 1), n))
    labels = tuple(sorted(rng.sample(LETTERS, n)))
    horizontal = rng.random() < 0.4
    first_slot = rng.randrange(SLOTS - n + 1)
    bar_width = rng.randint(10, 24)
    names = list(PALETTE)
    colours = (rng.choice(names),) * n if rng.random() < 0.5 else tuple(rng.sample(names, n))
    question = _question(rng, labels, values, tick, hard)
    return Chart(
        seed=seed,
        labels=labels,
        values=values,
        question=question,
        horizontal=horizontal,
        tick=tick,
        first_slot=first_slot,
        bar_width=bar_width,
        colours=colours,
        jitter_seed=rng.randrange(2**31),
    )
