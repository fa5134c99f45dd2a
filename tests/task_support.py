"""A second task in a few lines, and scripted models of it (tests/test_task_seam.py).

``DigitsTask``: two digits drawn on an image, the question asks for their sum. It is all a task
gives the library (``dreamr_stream.tasks.Task``); nothing outside this module knows it.
``DigitsModel`` is a scripted "model" of the task: it reads an image by finding the item drawn
on it among the items it has seen, then writes that item's steps (a draft may be taught to
get the sum wrong), so that the engine's verdicts and the task's answers can be checked.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from PIL import Image, ImageDraw

from dreamr_stream.backends.fake import FakeSession, ScriptedBackend
from dreamr_stream.tasks import JudgeItem, Split, Task, TaskItem, items

QUESTION = "What is the sum of the two digits?"
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


class DigitsTask:
    name = "digits"
    title = "add the two digits drawn on an image"

    def item(self, split: Split, index: int) -> TaskItem:
        rng = random.Random(f"digits/{split}/{index}")  # str seeds are stable across runs
        a, b = rng.randrange(10), rng.randrange(10)
        image = Image.new("RGB", (64, 32), "white")
        draw = ImageDraw.Draw(image)
        draw.text((12, 10), str(a), fill="black")
        draw.text((44, 10), str(b), fill="black")
        steps = (f"The digits are {a} and {b}.", f"{a} + {b} = {a + b}.", f"Answer: {a + b}")
        return TaskItem(self.name, split, index, image, QUESTION, steps, a + b, source=(a, b))

    def parse_answer(self, text: str) -> int | None:
        found = _ANSWER.findall(text)
        return int(found[-1]) if found else None

    def off_task_warnings(self, image: Image.Image, question: str) -> list[str]:
        return [] if "digit" in question.lower() else ["this task's models only add the two digits of an image"]

    def judge_item(self, item: TaskItem, rng: random.Random, p_correct: float = 0.5) -> JudgeItem:
        k = rng.randrange(len(item.steps))
        prefix, reference = list(item.steps[:k]), item.steps[k]
        if rng.random() < p_correct:
            return JudgeItem(item, prefix, reference, "none")
        last = list(re.finditer(r"\d+", reference))[-1]  # the step's result, one off
        wrong = reference[: last.start()] + str(int(last.group()) + 1) + reference[last.end() :]
        return JudgeItem(item, prefix, wrong, "arithmetic")


def sum_is_wrong(item: TaskItem) -> bool:
    """The items a ``DigitsModel(wrong_sums=True)`` gets wrong: those with an odd first digit."""
    return item.steps[0].split(" ")[3] in ("1", "3", "5", "7", "9")


class DigitsModel(ScriptedBackend):
    """A scripted model of a task that has seen the first ``n`` items of ``split``: it writes the
    reference steps of the item drawn on the image (nothing for an image it has not seen); with
    ``wrong_sums`` its sum step is one too high where ``sum_is_wrong``, and so is its answer."""

    def __init__(self, task: Task, split: Split, n: int, *, name: str, wrong_sums: bool = False) -> None:
        self.seen = {item.image.tobytes(): item for item in items(task, split, n)}
        self.by_key = {item.key: self._steps(item, wrong_sums) for item in self.seen.values()}
        super().__init__(self._write, name=name)

    @staticmethod
    def _steps(item: TaskItem, wrong_sums: bool) -> Sequence[str]:
        if not (wrong_sums and sum_is_wrong(item)):
            return item.steps
        wrong = item.answer + 1
        return (item.steps[0], item.steps[1].rsplit(" ", 1)[0] + f" {wrong}.", f"Answer: {wrong}")

    def _write(self, key: str, prefix: Sequence[str]) -> str | None:
        steps = self.by_key.get(key, ())
        return steps[len(prefix)] if len(prefix) < len(steps) else None

    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> FakeSession:
        """The session's "question" is the key of the item on the image: what the policy reads."""
        seen = self.seen.get(image.convert("RGB").tobytes())
        return super().open_session(image, seen.key if seen is not None else question, seed=seed)
