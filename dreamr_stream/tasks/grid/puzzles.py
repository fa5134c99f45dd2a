"""The demo task: count and compute over coloured shapes on a 4x4 grid.

Why it looks like this (the lessons are recorded in the model cards):

* One shape per 28 px cell and a 112 px image, so each visual token of the demo models
  (28 px patches) sees exactly one cell: perception is a per-token lookup.
* Solutions are short steps, each needing little perception: one step reads one grid row
  and tallies it with a running total right beside the reading, then a compute step, then
  ``Answer: N``. No step has to count across lines it cannot see next to each other.
* Few, clearly different colours and shapes.

Everything is a pure function of a seed, so splits are reproducible.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

__all__ = [
    "CELL",
    "COLOURS",
    "GRID",
    "IMAGE_SIZE",
    "SHAPES",
    "Cell",
    "Corruption",
    "JudgeItem",
    "Puzzle",
    "Question",
    "make_judge_item",
    "make_puzzle",
    "parse_answer",
    "render",
    "row_step",
    "split_seed",
]

GRID = 4
CELL = 28
IMAGE_SIZE = GRID * CELL
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
SIDES = {"circle": 0, "square": 4, "triangle": 3}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
Split = Literal["train", "val", "test", "hard"]
_SPLIT_OFFSET: dict[str, int] = {"train": 0, "val": 1_000_000_007, "test": 2_000_000_011, "hard": 3_000_000_019}

Cell = tuple[str, str] | None  # (colour, shape) or empty


@dataclass(frozen=True)
class Question:
    """A question over one or two cell predicates, with its arithmetic kind."""

    kind: Literal["count", "sides", "diff", "sum"]
    targets: tuple[tuple[str | None, str | None], ...]  # (colour, shape); None = any

    def matches(self, cell: Cell, which: int) -> bool:
        if cell is None:
            return False
        colour, shape = self.targets[which]
        return (colour is None or cell[0] == colour) and (shape is None or cell[1] == shape)

    def label(self, which: int) -> str:
        colour, shape = self.targets[which]
        if shape is None:
            return f"{colour}"
        noun = PLURAL[shape]
        return f"{colour} {noun}" if colour else noun

    def text(self) -> str:
        a = self.label(0)
        a_noun = f"{a} shapes" if self.targets[0][1] is None else a
        if self.kind == "count":
            return f"How many {a_noun} are there?"
        if self.kind == "sides":
            return f"How many sides do the {a_noun} have in total?"
        b = self.label(1)
        b_noun = f"{b} shapes" if self.targets[1][1] is None else b
        if self.kind == "diff":
            return f"How many more {a_noun} than {b_noun} are there?"
        return f"How many {a_noun} and {b_noun} are there in total?"


@dataclass(frozen=True)
class Puzzle:
    seed: int
    grid: tuple[tuple[Cell, ...], ...]
    question: Question
    jitter_seed: int

    @property
    def image(self) -> Image.Image:
        return render(self.grid, self.jitter_seed)

    def count(self, which: int) -> int:
        return sum(self.question.matches(c, which) for row in self.grid for c in row)

    @property
    def answer(self) -> int:
        q = self.question
        a = self.count(0)
        if q.kind == "count":
            return a
        if q.kind == "sides":
            shape = q.targets[0][1]
            assert shape is not None
            return a * SIDES[shape]
        b = self.count(1)
        return a - b if q.kind == "diff" else a + b

    def steps(self) -> list[str]:
        """The reference solution, one step per list item (no newlines inside)."""
        q = self.question
        totals = [0] * len(q.targets)
        steps = []
        for r, row in enumerate(self.grid):
            step, totals = row_step(q, r, row, totals)
            steps.append(step)
        a = totals[0]
        if q.kind == "sides":
            shape = q.targets[0][1]
            assert shape is not None
            steps.append(f"{a} x {SIDES[shape]} sides = {a * SIDES[shape]}.")
        elif q.kind == "diff":
            steps.append(f"{a} - {totals[1]} = {a - totals[1]}.")
        elif q.kind == "sum":
            steps.append(f"{a} + {totals[1]} = {a + totals[1]}.")
        steps.append(f"Answer: {self.answer}")
        return steps


def row_step(
    q: Question,
    r: int,
    row: tuple[Cell, ...],
    totals: list[int],
    counted: tuple[Cell, ...] | None = None,
) -> tuple[str, list[int]]:
    """One row's step and the running totals after it.

    Every matching cell is marked in place with the running counts of all the question's
    targets, so each decision is local: right after naming a cell, does it match (a mark), and
    what are the counts, i.e. the last ones written (a mark or the previous row's totals) with
    one added. The row ends with the totals so far, which the next row starts from:
    ``Row 2: red circle = red 3 blue 0, empty, blue square = red 3 blue 1. Red: 3. Blue: 1.``
    Earlier formats taught what not to do: per-row counts (``Red: 2, total 3.``) had one token
    count four cells (4% of them wrong with cells read 99.5% right), and marks carrying only
    their own target's count (``= red 3``) made two-target questions look back past the other
    target's marks (18% of mark counts wrong). Marks use only words the demo tokenizer already
    has as whole tokens.

    ``counted`` (default: ``row``) decides the marks, so a "misread" corruption can name one
    cell while counting another.
    """
    totals = list(totals)
    parts = []
    for cell, seen in zip(row, counted or row, strict=True):
        text = "empty" if cell is None else f"{cell[0]} {cell[1]}"
        hit = [w for w in range(len(q.targets)) if q.matches(seen, w)]
        for w in hit:
            totals[w] += 1
        if hit:  # the full state, so the next mark only copies the last one and adds 1
            text += " = " + " ".join(f"{q.label(w)} {totals[w]}" for w in range(len(q.targets)))
        parts.append(text)
    tallies = " ".join(f"{q.label(w).capitalize()}: {totals[w]}." for w in range(len(totals)))
    return f"Row {r + 1}: {', '.join(parts)}. {tallies}", totals


def split_seed(split: Split, index: int) -> int:
    """Disjoint seed streams per split."""
    return _SPLIT_OFFSET[split] + index


def _random_question(rng: random.Random) -> Question:
    kind = rng.choices(["count", "sides", "diff", "sum"], weights=[4, 2, 2, 2])[0]

    def target(allow_colour_only: bool = True) -> tuple[str | None, str | None]:
        mode = rng.choice(["colour", "shape", "both"] if allow_colour_only else ["shape", "both"])
        colour = rng.choice(list(COLOURS)) if mode in ("colour", "both") else None
        shape = rng.choice(SHAPES) if mode in ("shape", "both") else None
        return colour, shape

    if kind == "count":
        return Question("count", (target(),))
    if kind == "sides":
        colour = rng.choice([None, *COLOURS])
        return Question("sides", ((colour, rng.choice(["square", "triangle"])),))
    # two targets of the same kind (two colours or two shapes), distinct
    two: Literal["diff", "sum"] = "diff" if kind == "diff" else "sum"
    if rng.random() < 0.5:
        a, b = rng.sample(list(COLOURS), 2)
        return Question(two, ((a, None), (b, None)))
    a, b = rng.sample(SHAPES, 2)
    return Question(two, ((None, a), (None, b)))


def make_puzzle(seed: int, *, hard: bool = False) -> Puzzle:
    """A puzzle from a seed. ``hard`` puzzles are denser and ask two-target questions."""
    rng = random.Random(seed)
    density = rng.uniform(0.7, 0.95) if hard else rng.uniform(0.35, 0.8)
    grid = tuple(
        tuple((rng.choice(list(COLOURS)), rng.choice(SHAPES)) if rng.random() < density else None for _ in range(GRID))
        for _ in range(GRID)
    )
    question = _random_question(rng)
    while hard and question.kind == "count":
        question = _random_question(rng)
    if question.kind == "diff":
        probe = Puzzle(seed, grid, question, 0)
        if probe.count(0) < probe.count(1):  # keep answers non-negative
            question = Question("diff", (question.targets[1], question.targets[0]))
    return Puzzle(seed=seed, grid=grid, question=question, jitter_seed=rng.randrange(2**31))


def render(grid: tuple[tuple[Cell, ...], ...], jitter_seed: int = 0) -> Image.Image:
    """Draw the grid: white background, one filled shape per occupied cell, slight jitter."""
    rng = random.Random(jitter_seed)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            colour = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in COLOURS[cell[0]])
            half = rng.randint(9, 11)
            cx = c * CELL + CELL // 2 + rng.randint(-1, 1)
            cy = r * CELL + CELL // 2 + rng.randint(-1, 1)
            box = (cx - half, cy - half, cx + half, cy + half)
            if cell[1] == "circle":
                draw.ellipse(box, fill=colour)
            elif cell[1] == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return img


_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def parse_answer(text: str) -> int | None:
    """The integer after the last ``Answer:`` in ``text``, or None."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


# ---------------------------------------------------------------- judge items

# "draft": a draft's own wrong step (``zoo/draft_steps.py``), not a made-up corruption;
# "swap": one word or digit of a correct step replaced (``zoo/judge_layers.swap_word``)
Corruption = Literal["none", "misread", "misread_consistent", "count", "total", "arithmetic", "answer", "draft", "swap"]


@dataclass(frozen=True)
class JudgeItem:
    puzzle: Puzzle
    prefix: list[str]  # verified reference steps before the candidate
    candidate: str
    corruption: Corruption

    @property
    def correct(self) -> bool:
        return self.corruption == "none"


def _other_cell(rng: random.Random, cell: Cell) -> Cell:
    options: list[Cell] = [None] + [(col, sh) for col in COLOURS for sh in SHAPES]
    if cell is not None:
        # bias towards the confusions a weak reader makes: one attribute wrong
        near = [o for o in options if o is not None and o != cell and (o[0] == cell[0] or o[1] == cell[1])]
        if rng.random() < 0.8:
            return rng.choice(near)
    return rng.choice([o for o in options if o != cell])


def _bump(rng: random.Random, value: int, low: int = 0) -> int:
    choices = [v for v in (value - 2, value - 1, value + 1, value + 2) if v >= low]
    return rng.choice(choices)


def make_judge_item(puzzle: Puzzle, rng: random.Random, p_correct: float = 0.5) -> JudgeItem:
    """A (prefix, candidate) pair: the reference step, or a corrupted version of it."""
    steps = puzzle.steps()
    k = rng.randrange(len(steps))
    prefix, reference = steps[:k], steps[k]
    if rng.random() < p_correct:
        return JudgeItem(puzzle, prefix, reference, "none")
    n_rows = len(puzzle.grid)
    if k < n_rows:  # a row step
        kind: Corruption = rng.choice(["misread", "misread_consistent", "count", "total"])
        q, row = puzzle.question, puzzle.grid[k]
        totals_before = [sum(q.matches(c, w) for r in puzzle.grid[:k] for c in r) for w in range(len(q.targets))]
        if kind in ("misread", "misread_consistent"):
            col = rng.randrange(GRID)
            wrong = tuple(_other_cell(rng, c) if i == col else c for i, c in enumerate(row))
            # misread: names the wrong cell but marks and totals follow the image;
            # misread_consistent: marks and totals follow the misreading
            counted = row if kind == "misread" else wrong
            bad, _ = row_step(q, k, wrong, totals_before, counted=counted)
            return JudgeItem(puzzle, prefix, bad, kind)
        head, tail = reference.split(". ", 1)
        cells_at = head.index(": ")  # after "Row N": every number in the cells is a mark's count
        marks = list(re.finditer(r"\d+", head[cells_at:]))
        if kind == "count" and marks:  # a mark's running count is off
            m = marks[rng.randrange(len(marks))]
            a, b = cells_at + m.start(), cells_at + m.end()
            bumped = str(_bump(rng, int(m.group())))
            return JudgeItem(puzzle, prefix, head[:a] + bumped + head[b:] + ". " + tail, "count")
        numbers = list(re.finditer(r"\d+", tail))  # the row-end totals
        m = numbers[rng.randrange(len(numbers))]
        new_tail = tail[: m.start()] + str(_bump(rng, int(m.group()))) + tail[m.end() :]
        return JudgeItem(puzzle, prefix, f"{head}. {new_tail}", "total")
    if reference.startswith("Answer:"):
        return JudgeItem(puzzle, prefix, f"Answer: {_bump(rng, puzzle.answer, low=-99)}", "answer")
    m = list(re.finditer(r"-?\d+", reference))[-1]
    bad = reference[: m.start()] + str(_bump(rng, int(m.group()), low=-99)) + reference[m.end() :]
    return JudgeItem(puzzle, prefix, bad, "arithmetic")
