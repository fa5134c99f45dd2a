"""The charts task's reference solutions: one bar read per step, with the running result beside it.

Each reading step names one bar and its printed value, and (for the questions over every bar)
the running result right after it, so each decision is local: the value is one token's reading,
and the result is the previous step's result updated with the one value just written:

* value: ``Bar C: 12.`` then ``Answer: 12``
* diff: ``Bar C: 32.`` ``Bar A: 15.`` ``Difference: 32 - 15 = 20 - 3 = 17.`` ``Answer: 17``
* top_two: ``Bar A: 5. Largest: 5.`` ``Bar B: 19. Largest: 19, 5.`` ``Bar C: 7. Largest: 19, 7.``
  ``Sum: 19 + 7 = 10 + 16 = 26.`` ``Answer: 26``
* median: ``Bar A: 5. Sorted: 5.`` ``Bar B: 9. Sorted: 5, 9.`` ``Bar C: 7. Sorted: 5, 7, 9.``
  ``Middle: 7.`` ``Answer: 7``
* above: ``Bar A: 8 > 6. Count: 1.`` ``Bar B: 5 < 6. Count: 1.`` ... ``Answer: 2``

Bars are read in the chart's reading order (left to right, or top to bottom), except the value and
diff questions, which read only the bars they name, in the question's order. No step counts or
compares across steps it cannot see next to each other (the grid task's lesson).

A sum or a difference is written through its tens and its units (``tens_and_units``): ``19 + 7``
is ``10 + 16``, the tens' sum and the units' sum, then ``26``. Numbers are single tokens, so a
model that writes ``19 + 7 = 26`` at once must have learned every pair of values as its own fact
(about 1,800 of them below 60), and the first chart target wrote sums one or two off (15 of its
22 wrong answers in 100). Through tens and units each number written depends on two digits or on
a round number and a small one. It helped less than hoped (the second target's card): the tens
come out right, but a units digit or the last addition is still one off at times, because a
number token carries its size far better than its last digit.
"""

from __future__ import annotations

import re

from dreamr_stream.tasks.charts.chart import Chart, Question

__all__ = [
    "State",
    "advance",
    "answer",
    "compute_step",
    "parse_answer",
    "reading_order",
    "reading_step",
    "readings",
    "start",
    "steps",
    "tens_and_units",
]

# the running result after some readings: top_two, the largest values so far, largest first;
# median, every value so far in ascending order; above, the count so far; else nothing
State = tuple[int, ...]


def reading_order(chart: Chart) -> list[int]:
    """The bars the solution reads, as indices into ``chart.values``, in the order it reads them."""
    q = chart.question
    if q.kind in ("value", "diff"):
        return [chart.labels.index(b) for b in q.bars]
    return list(range(len(chart.values)))


def start(q: Question) -> State:
    return (0,) if q.kind == "above" else ()


def advance(q: Question, state: State, value: int) -> State:
    """The running result after reading ``value``."""
    if q.kind == "top_two":
        return tuple(sorted((*state, value), reverse=True)[:2])
    if q.kind == "median":
        return tuple(sorted((*state, value)))
    if q.kind == "above":
        return (state[0] + (value > q.threshold),)
    return state


def _listed(state: State) -> str:
    return ", ".join(str(v) for v in state)


def reading_step(q: Question, label: str, value: int, state: State) -> str:
    """The step reading bar ``label`` as ``value``, with ``state``, the running result after it."""
    head = f"Bar {label}: {value}"
    if q.kind == "above":
        sign = ">" if value > q.threshold else "<" if value < q.threshold else "="
        return f"{head} {sign} {q.threshold}. Count: {state[0]}."
    if q.kind == "top_two":
        return f"{head}. Largest: {_listed(state)}."
    if q.kind == "median":
        return f"{head}. Sorted: {_listed(state)}."
    return f"{head}."


def readings(chart: Chart) -> list[tuple[str, int, State]]:
    """Each reading's bar letter, value and running result after it, in reading order."""
    q, state, out = chart.question, start(chart.question), []
    for i in reading_order(chart):
        state = advance(q, state, chart.values[i])
        out.append((chart.labels[i], chart.values[i], state))
    return out


def tens_and_units(a: int, b: int, sign: int) -> str:
    """``a + b`` (``sign`` 1) or ``a - b`` (``sign`` -1, ``a >= b >= 0``) written through the
    tens and the units: ``a ± b = tens ± units = result``, where ``tens`` is the tens of ``a``
    and ``b`` combined (a round number) and ``units`` their units combined."""
    tens = 10 * (a // 10 + sign * (b // 10))
    units = a % 10 + sign * (b % 10)
    op = "+" if sign > 0 else "-"
    part = f"+ {units}" if units >= 0 else f"- {-units}"
    return f"{a} {op} {b} = {tens} {part} = {tens + units}"


def compute_step(q: Question, values: list[int], state: State) -> str | None:
    """The step after the readings (of ``values``, ending in ``state``), or None where the last
    reading's result is already the answer (value, above)."""
    if q.kind == "diff":
        a, b = values
        return f"Difference: {tens_and_units(a, b, -1)}."
    if q.kind == "top_two":
        a, b = state
        return f"Sum: {tens_and_units(a, b, 1)}."
    if q.kind == "median":
        return f"Middle: {state[len(state) // 2]}."
    return None


def answer(chart: Chart) -> int:
    """The answer, from the chart's values (not from the steps)."""
    q, values = chart.question, chart.values
    if q.kind == "value":
        return chart.value_of(q.bars[0])
    if q.kind == "diff":
        return chart.value_of(q.bars[0]) - chart.value_of(q.bars[1])
    if q.kind == "top_two":
        return sum(sorted(values)[-2:])
    if q.kind == "median":
        return sorted(values)[len(values) // 2]
    return sum(v > q.threshold for v in values)


def steps(chart: Chart) -> list[str]:
    """The reference solution, one step per entry (no newline inside), the last ``Answer: N``."""
    q, read = chart.question, readings(chart)
    out = [reading_step(q, label, value, state) for label, value, state in read]
    last = compute_step(q, [value for _, value, _ in read], read[-1][2])
    if last is not None:
        out.append(last)
    out.append(f"Answer: {answer(chart)}")
    return out


_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def parse_answer(text: str) -> int | None:
    """The integer after the last ``Answer:`` in ``text``, or None."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None
