"""What in a request lies outside the charts task: another image, a question it never asks."""

from __future__ import annotations

import re

from PIL import Image

from dreamr_stream.tasks.charts.chart import LETTERS
from dreamr_stream.tasks.charts.render import AXIS, BASE, IMAGE_SIZE

__all__ = ["off_task_warnings"]

_LETTER = f"[{LETTERS.lower()}]"
# every question the task asks, normalised (``_normalise``)
_QUESTIONS = [
    re.compile(rf"what is the value of bar {_LETTER}"),
    re.compile(rf"how much greater is bar ({_LETTER}) than bar (?!\1){_LETTER}"),
    re.compile(r"what is the sum of the two largest values"),
    re.compile(r"what is the median value of the bars"),
    re.compile(r"how many bars have a value above [1-9]\d?"),
]


def _normalise(question: str) -> str:
    return " ".join(question.lower().replace("?", " ").split())


def _looks_like_chart(image: Image.Image) -> bool:
    """A chart of the task: 224 px square, near-white corners (margin), and both axes drawn
    (pixels every chart has dark, whichever way its bars run)."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        return False
    rgb = image.convert("RGB")
    last = IMAGE_SIZE - 1
    corners = [rgb.getpixel(xy) for xy in ((0, 0), (last, 0), (0, last), (last, last))]
    axes = [rgb.getpixel(xy) for xy in ((AXIS, BASE - 2 * AXIS), (AXIS + 2 * AXIS, BASE))]
    white = all(isinstance(p, tuple) and min(p) >= 235 for p in corners)
    return white and all(isinstance(p, tuple) and max(p) <= 120 for p in axes)


def off_task_warnings(image: Image.Image, question: str) -> list[str]:
    """What in a request lies outside the charts task (its models only read the task's bar
    charts): they answer anything confidently, so a caller should say so first."""
    warnings_: list[str] = []
    if not _looks_like_chart(image):
        warnings_.append(
            f"the image ({image.width}x{image.height}) is not a chart of the charts task; its models only "
            f"read {IMAGE_SIZE}x{IMAGE_SIZE} bar charts drawn by the task (dreamr reason --task charts --random "
            "makes one)"
        )
    if not any(q.fullmatch(_normalise(question)) for q in _QUESTIONS):
        warnings_.append(
            "the question is not one the charts task asks (e.g. 'What is the value of bar C?'); "
            "its models will still answer with a number"
        )
    return warnings_
