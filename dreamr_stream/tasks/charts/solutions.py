"""The charts task's reference solutions: one bar read per step, with the running result beside it.

Each reading step names one bar and its printed value, and (for the questions over every bar)
the running result right after it, so each decision is local: the value is one token's reading,
and the result is the previous step's result updated with the one value just written:

* value: ``Bar C: 12.`` then ``Answer: 12``
* diff: ``Bar C: 32.`` ``Bar A: 15.`` ``Difference: 32 - 15: 12 - 5 = 7; 3 - 1 - 1 = 1; 17.`` ``Answer: 17``
* top_two: ``Bar A: 5. Largest: 5.`` ``Bar B: 19. Largest: 19, 5.`` ``Bar C: 7. Largest: 19, 7.``
  ``Sum: 19 + 7: 9 + 7 = 16; 1 + 0 + 1 = 2; 26.`` ``Answer: 26``
* median: ``Bar A: 5. Sorted: 5.`` ``Bar B: 9. Sorted: 5, 9.`` ``Bar C: 7. Sorted: 5, 7, 9.``
  ``Middle: 7.`` ``Answer: 7``
* above: ``Bar A: 8 > 6. Count: 1.`` ``Bar B: 5 < 6. Count: 1.`` ... ``Answer: 2``

Bars are read in the chart's reading order (left to right, or top to bottom), except the value and
diff questions, which read only the bars they name, in the question's order. No step counts or
compares across steps it cannot see next to each other (the grid task's lesson).

A sum or a difference is worked in columns (``column``), as at school: the units first, then
the tens with the carry or the borrow, then the result. ``19 + 7`` is ``9 + 7 = 16`` (the units),
``1 + 0 + 1 = 2`` (the tens and the carry, the tens digit of the units' sum), ``26``; ``32 - 15``
is ``12 - 5 = 7`` (a ten borrowed, as 2 is less than 5), ``3 - 1 - 1 = 1`` (the tens less the
borrow), ``17``. Every operation written is on single digits, each written as its own token
before it is used, so each number written depends on two or three small numbers just before it.
Why: numbers are single tokens, and a number token's embedding carries its size far better than
its last digit. A first target that wrote ``19 + 7 = 26`` at once was one or two off on 15 of its
22 wrong answers in 100; a second, through the tens and the units at once (``19 + 7 = 10 + 16 =
26``), still wrote a units part one off (the chart target's card).
"""

from __future__ import annotations

import re

from dreamr_stream.tasks.charts.chart import Chart, Question

__all__ = [
    "State",
    "advance",
    "answer",
    "column",
    "compute_step",
    "parse_answer",
    "reading_order",
    "reading_step",
    "readings",
    "start",
    "steps",
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


def column(a: int, b: int, sign: int) -> str:
    """``a + b`` (``sign`` 1) or ``a - b`` (``sign`` -1, ``a >= b >= 0``) worked in columns:
    ``a ± b: units; tens; result``. The units are ``a``'s units digit plus or minus ``b``'s (ten
    more on ``a``'s side when a difference borrows); the tens are the tens digits (and for a sum
    of up to 99 + 99, the hundreds with them) with the carry added or the borrow taken, always
    written, ``0`` when there is none."""
    if sign > 0:
        units = a % 10 + b % 10
        carry = units // 10
        tens = a // 10 + b // 10 + carry
        return f"{a} + {b}: {a % 10} + {b % 10} = {units}; {a // 10} + {b // 10} + {carry} = {tens}; {a + b}"
    if not a >= b >= 0:
        raise ValueError(f"a difference worked in columns needs a >= b >= 0, not {a} - {b}")
    borrow = int(a % 10 < b % 10)
    top = a % 10 + 10 * borrow
    tens = a // 10 - b // 10 - borrow
    return f"{a} - {b}: {top} - {b % 10} = {top - b % 10}; {a // 10} - {b // 10} - {borrow} = {tens}; {a - b}"


def compute_step(q: Question, values: list[int], state: State) -> str | None:
    """The step after the readings (of ``values``, ending in ``state``), or None where the last
    reading's result is already the answer (value, above)."""
    if q.kind == "diff":
        a, b = values
        return f"Difference: {column(a, b, -1)}."
    if q.kind == "top_two":
        a, b = state
        return f"Sum: {column(a, b, 1)}."
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
