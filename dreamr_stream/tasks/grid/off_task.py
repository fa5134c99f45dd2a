"""What in a request lies outside the grid task: a photo, a question it never asks."""

from __future__ import annotations

from functools import cache
from itertools import permutations

from PIL import Image

from dreamr_stream.tasks.grid.puzzles import COLOURS, IMAGE_SIZE, SHAPES, Question

__all__ = ["off_task_warnings"]


def _normalise(question: str) -> str:
    return " ".join(question.lower().replace("?", " ").split())


@cache
def _questions() -> frozenset[str]:
    """Every question the grid task asks (a few dozen), normalised."""
    colours: list[str | None] = [None, *COLOURS]
    shapes: list[str | None] = [None, *SHAPES]
    ones = [(c, s) for c in colours for s in shapes if (c, s) != (None, None)]
    questions = [Question("count", (t,)) for t in ones]
    questions += [Question("sides", ((c, s),)) for c in colours for s in ("square", "triangle")]
    pairs = [*permutations([(c, None) for c in COLOURS], 2), *permutations([(None, s) for s in SHAPES], 2)]
    questions += [Question(kind, pair) for kind in ("diff", "sum") for pair in pairs]
    return frozenset(_normalise(q.text()) for q in questions)


def _looks_like_grid(image: Image.Image) -> bool:
    """A grid puzzle: 112 px square on a near-white background (its four corners are empty margin)."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        return False
    corners = [(0, 0), (IMAGE_SIZE - 1, 0), (0, IMAGE_SIZE - 1), (IMAGE_SIZE - 1, IMAGE_SIZE - 1)]
    pixels = [image.convert("RGB").getpixel(xy) for xy in corners]
    return all(isinstance(p, tuple) and min(p) >= 235 for p in pixels)


def off_task_warnings(image: Image.Image, question: str) -> list[str]:
    """What in a request lies outside the grid task (its models only count shapes on a 4x4
    grid): they answer anything confidently, so a caller should say so first."""
    warnings_: list[str] = []
    if not _looks_like_grid(image):
        warnings_.append(
            f"the image ({image.width}x{image.height}) is not a demo grid puzzle; the shipped demo models only "
            "read 112x112 grids of coloured shapes (dreamr reason --random makes one)"
        )
    if _normalise(question) not in _questions():
        warnings_.append(
            "the question is not one the demo task asks (e.g. 'How many red shapes are there?'); "
            "the shipped demo models will still answer with a count"
        )
    return warnings_
