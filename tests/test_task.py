"""The demo task: reference solutions, answers and judge items are consistent with the grid."""

from __future__ import annotations

import random
import re

import pytest

from dreamr_stream.tasks.grid.puzzles import GRID, make_judge_item, make_puzzle, parse_answer, render, split_seed


@pytest.mark.parametrize("seed", range(40))
def test_solution_marks_every_matching_cell_with_the_running_counts(seed: int) -> None:
    p = make_puzzle(split_seed("train", seed), hard=seed % 3 == 0)
    q = p.question
    steps = p.steps()
    assert len(steps) == GRID + (1 if q.kind == "count" else 2)
    assert steps[-1] == f"Answer: {p.answer}" and parse_answer("\n".join(steps)) == p.answer
    running = [0] * len(q.targets)
    for r, (row, step) in enumerate(zip(p.grid, steps, strict=False)):
        head, tail = step.split(". ", 1)
        assert head.startswith(f"Row {r + 1}: ")
        cells = head.removeprefix(f"Row {r + 1}: ").split(", ")
        assert len(cells) == GRID
        for cell, text in zip(row, cells, strict=True):
            expected = "empty" if cell is None else f"{cell[0]} {cell[1]}"
            hit = [w for w in range(len(q.targets)) if q.matches(cell, w)]
            assert len(hit) <= 1  # two-target questions ask about disjoint kinds
            for w in hit:
                running[w] += 1
                expected += " = " + " ".join(f"{q.label(v)} {running[v]}" for v in range(len(running)))
            assert text == expected
        assert tail == " ".join(f"{q.label(w).capitalize()}: {running[w]}." for w in range(len(running)))
    assert running == [p.count(w) for w in range(len(q.targets))]


def test_answers_follow_the_question_kind() -> None:
    kinds = set()
    for i in range(300):
        p = make_puzzle(split_seed("val", i))
        kinds.add(p.question.kind)
        a = p.count(0)
        expected = {
            "count": a,
            "sides": a * {"square": 4, "triangle": 3}.get(str(p.question.targets[0][1]), 0),
            "diff": a - p.count(1) if len(p.question.targets) > 1 else None,
            "sum": a + p.count(1) if len(p.question.targets) > 1 else None,
        }[p.question.kind]
        assert p.answer == expected and p.answer >= 0
    assert kinds == {"count", "sides", "diff", "sum"}


def test_splits_are_disjoint_and_reproducible() -> None:
    assert make_puzzle(split_seed("test", 3)) == make_puzzle(split_seed("test", 3))
    assert make_puzzle(split_seed("test", 3)).grid != make_puzzle(split_seed("train", 3)).grid
    hard = [make_puzzle(split_seed("hard", i), hard=True) for i in range(50)]
    assert all(p.question.kind != "count" for p in hard)
    img = render(hard[0].grid, hard[0].jitter_seed)
    assert img.size == (112, 112)


def test_judge_items_are_corrupted_where_they_say() -> None:
    rng = random.Random(0)
    seen = set()
    for i in range(600):
        p = make_puzzle(split_seed("train", i))
        item = make_judge_item(p, rng)
        reference = p.steps()[len(item.prefix)]
        assert item.prefix == p.steps()[: len(item.prefix)]
        seen.add(item.corruption)
        if item.correct:
            assert item.candidate == reference
            continue
        assert item.candidate != reference
        if item.corruption in ("misread", "misread_consistent"):
            # exactly one cell is named differently
            names = [re.sub(r" = .*", "", c) for c in item.candidate.split(". ", 1)[0].split(", ")]
            truth = [re.sub(r" = .*", "", c) for c in reference.split(". ", 1)[0].split(", ")]
            assert sum(a != b for a, b in zip(names, truth, strict=True)) == 1
        if item.corruption in ("count", "total"):
            assert re.sub(r"\d+", "N", item.candidate) == re.sub(r"\d+", "N", reference)
    assert seen == {"none", "misread", "misread_consistent", "count", "total", "arithmetic", "answer"}
