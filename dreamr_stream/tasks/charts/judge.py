"""The charts task's judge items: a reference step, or one corrupted as a weak chart reader would.

A reading step can be corrupted three ways: ``misread`` (the bar's value read wrong: a digit or
two off, a gridline off, digits swapped), ``wrong_bar`` (another bar's value: the neighbouring
bar's value under this bar's letter, or the neighbouring bar named and read), both with the
running result following the wrong value, as a reader who believed it would write it; and
``running`` (the value right, the running result wrong: a count off by one, a largest value
dropped, a sorted list out of order). The step after the readings gets ``arithmetic`` (a wrong
units, tens or result of a difference or sum worked in columns, the wrong middle value), the last
one ``answer``. Every corrupted step differs from the reference step (the chart's values are
distinct).
"""

from __future__ import annotations

import random
import re
from typing import Literal

from dreamr_stream.tasks.charts.chart import MAX_VALUE, Chart
from dreamr_stream.tasks.charts.solutions import State, advance, reading_order, reading_step, readings, start, steps

__all__ = ["Corruption", "MadeJudgeItem", "make_judge_item", "misread_value"]

# "draft" (a draft's own wrong step) and "swap" (a word or a value cell swapped) are made by the
# training pipeline for any task; the rest are this task's own
Corruption = Literal["none", "misread", "wrong_bar", "running", "arithmetic", "answer", "draft", "swap"]
MadeJudgeItem = tuple[list[str], str, Corruption]  # prefix, candidate, how it was made


def _bump(rng: random.Random, value: int, low: int = 0) -> int:
    return rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2) if v >= low])


def misread_value(rng: random.Random, value: int, chart: Chart) -> int:
    """A plausible misreading of a printed ``value`` of ``chart``: one or two off, a gridline off,
    its digits swapped; never ``value`` itself, always a value a chart can print, never the
    threshold of an ``above`` question (a reading is then above or below it, as in the references)."""
    tick, q = chart.tick, chart.question
    options = {value - 2, value - 1, value + 1, value + 2, value - tick, value + tick}
    if value >= 10 and value % 10 != value // 10 and value % 10:
        options.add(int(str(value)[::-1]))
    banned = {value, q.threshold} if q.kind == "above" else {value}
    return rng.choice(sorted(v for v in options if 1 <= v <= MAX_VALUE and v not in banned))


def _wrong_running(rng: random.Random, chart: Chart, seen: list[int], state: State) -> State:
    """A wrong running result after reading ``seen`` (whose right result is ``state``)."""
    q = chart.question
    if q.kind == "above":
        return (_bump(rng, state[0]),)
    if q.kind == "top_two" and len(seen) >= 2:  # one of the largest forgotten
        dropped = list(seen)
        dropped.remove(rng.choice(state))
        wrong = start(q)
        for v in dropped:
            wrong = advance(q, wrong, v)
        return wrong
    if q.kind == "median" and len(state) >= 2:  # two neighbours out of order
        i = rng.randrange(len(state) - 1)
        return (*state[:i], state[i + 1], state[i], *state[i + 2 :])
    return (_bump(rng, state[0], low=1),)


def _reading(rng: random.Random, chart: Chart, k: int) -> tuple[str, Corruption]:
    """Reading step ``k`` corrupted."""
    q, order, read = chart.question, reading_order(chart), readings(chart)
    before = read[k - 1][2] if k else start(q)
    i = order[k]
    label, value, state = read[k]
    kinds: list[Corruption] = ["misread", "wrong_bar"]
    if q.kind in ("top_two", "median", "above"):
        kinds.append("running")
    kind = rng.choice(kinds)
    if kind == "misread":
        wrong = misread_value(rng, value, chart)
        return reading_step(q, label, wrong, advance(q, before, wrong)), kind
    if kind == "wrong_bar":
        j = rng.choice([n for n in (i - 1, i + 1) if 0 <= n < len(chart.values)])
        named = label if rng.random() < 0.5 else chart.labels[j]
        return reading_step(q, named, chart.values[j], advance(q, before, chart.values[j])), kind
    seen = [v for _, v, _ in read[: k + 1]]
    return reading_step(q, label, value, _wrong_running(rng, chart, seen, state)), kind


def _arithmetic(rng: random.Random, chart: Chart, reference: str) -> str:
    """The step after the readings with a wrong result."""
    if chart.question.kind == "median":  # the wrong one of the sorted values
        ordered = sorted(chart.values)
        mid = len(ordered) // 2
        return f"Middle: {ordered[rng.choice((mid - 1, mid + 1))]}."
    # a sum or a difference is ``a ± b: x ± y = units; c ± d ± carry = tens; result``
    # (``solutions.column``): one of the three computed parts wrong (the result by a ten at times,
    # as a slip in its tens would make it)
    units, tens, result = list(re.finditer(r"\d+", reference))[-3:]
    m = rng.choice((units, tens, result))
    value = int(m.group())
    if m is result and rng.random() < 0.5:
        wrong = rng.choice([v for v in (value - 10, value + 10) if v >= 0])
    else:
        wrong = _bump(rng, value)
    return reference[: m.start()] + str(wrong) + reference[m.end() :]


def make_judge_item(chart: Chart, rng: random.Random, p_correct: float = 0.5) -> MadeJudgeItem:
    """A (prefix, candidate) pair at a random step: the reference step, or a corrupted one."""
    solution = steps(chart)
    k = rng.randrange(len(solution))
    prefix, reference = solution[:k], solution[k]
    if rng.random() < p_correct:
        return prefix, reference, "none"
    if k < len(reading_order(chart)):
        candidate, kind = _reading(rng, chart, k)
        return prefix, candidate, kind
    if k == len(solution) - 1:
        answer = int(reference.removeprefix("Answer: "))
        return prefix, f"Answer: {_bump(rng, answer)}", "answer"
    return prefix, _arithmetic(rng, chart, reference), "arithmetic"
