"""The charts task: items are deterministic per split and disjoint across splits; every reference
solution is right when recomputed from the chart's own values; judge items' corruptions are wrong
and their reference steps right; the images are what the task's models are built to read."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from typing import cast

import pytest
from PIL import Image

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import DEFAULT_TASK, SPLITS, Split, Task, TaskItem, get_task, task_names
from dreamr_stream.tasks.charts import ChartsTask
from dreamr_stream.tasks.charts.chart import EASY_TICKS, HARD_TICKS, KINDS, LETTERS, Chart, split_seed
from dreamr_stream.tasks.charts.render import CELL, CELL_CLASSES, GRID, IMAGE_SIZE, bar_boxes
from dreamr_stream.tasks.charts.solutions import column
from dreamr_stream.zoo.task_needs import MixedTask, PerceptionTask, SwapTask, perception_task

TASK = cast(ChartsTask, get_task("charts"))  # its extras typed; the tests check it is one
N = 150  # items per split the checks below read
OWN_CORRUPTIONS = {"misread", "wrong_bar", "running", "arithmetic", "answer"}
INK = (25, 25, 25)  # the printed values' and letters' colour, and nothing else's


def chart(item: TaskItem) -> Chart:
    assert isinstance(item.source, Chart)
    return item.source


def some_items(n: int = N) -> list[TaskItem]:
    return [TASK.item(split, i) for split in SPLITS for i in range(n)]


ITEMS = some_items()


# ------------------------------------------------------------------ the seam


def test_the_task_is_registered_beside_the_grid_and_meets_the_protocols() -> None:
    assert "charts" in task_names() and DEFAULT_TASK == "grid" and get_task() is not TASK
    assert isinstance(TASK, ChartsTask) and isinstance(TASK, Task) and TASK.name == "charts" and TASK.title
    # and what the zoo's training pipeline asks of a task
    assert isinstance(TASK, MixedTask) and isinstance(TASK, PerceptionTask) and isinstance(TASK, SwapTask)
    assert (TASK.image_size, TASK.cell_size) == (IMAGE_SIZE, CELL) == (224, 28)


@pytest.mark.parametrize("split", SPLITS)
def test_items_are_a_pure_function_of_split_and_index(split: Split) -> None:
    fresh = ChartsTask()
    for index in (0, 1, 17, 999_999_999):
        a, b = TASK.item(split, index), fresh.item(split, index)
        assert a == b and a.source == b.source and a.key == f"charts/{split}/{index}"
        assert a.image.tobytes() == b.image.tobytes()
    assert TASK.item(split, 0) != TASK.item(split, 1)
    with pytest.raises(ConfigError, match="index"):
        TASK.item(split, -1)


def test_splits_are_disjoint() -> None:
    seeds = {split: {split_seed(split, i) for i in (0, 10**9 - 1)} for split in SPLITS}
    ranges = sorted((min(s), max(s)) for s in seeds.values())
    assert all(hi < lo for (_, hi), (lo, _) in itertools.pairwise(ranges))
    images = {split: {TASK.item(split, i).image.tobytes() for i in range(N)} for split in SPLITS}
    for a in SPLITS:
        assert len(images[a]) == N  # no two items of a split alike either
        for b in SPLITS:
            assert a == b or not images[a] & images[b]


def test_mixed_items_give_hard_charts_in_every_split() -> None:
    for split in ("train", "val", "test"):
        for i in range(20):
            hard, easy = TASK.mixed_item(split, i, hard=True), TASK.mixed_item(split, i, hard=False)
            assert easy == TASK.item(split, i) and hard.key == easy.key
            assert len(chart(hard).values) in (5, 6) and chart(hard).tick in HARD_TICKS


# ------------------------------------------------------------------ charts and questions


def test_every_question_kind_and_both_orientations_appear_and_hard_is_harder() -> None:
    for split in SPLITS:
        charts = [chart(TASK.item(split, i)) for i in range(N)]
        kinds = Counter(c.question.kind for c in charts)
        horizontal = sum(c.horizontal for c in charts)
        assert 0.2 * N < horizontal < 0.6 * N  # both orientations, in every split
        bars = {len(c.values) for c in charts}
        if split == "hard":
            assert set(kinds) == set(KINDS) - {"value"} and bars == {5, 6}
            assert {c.tick for c in charts} == set(HARD_TICKS)
        else:
            assert set(kinds) == set(KINDS) and bars == {3, 4, 5, 6}
            assert {c.tick for c in charts} == set(EASY_TICKS)
        assert len({c.bar_width for c in charts}) > 8 and len({c.colours for c in charts}) > N // 2


def test_charts_have_distinct_lettered_values_on_their_axis() -> None:
    for item in ITEMS:
        c = chart(item)
        assert 3 <= len(c.values) <= 6 and len(set(c.values)) == len(c.values) == len(c.labels)
        assert list(c.labels) == sorted(set(c.labels)) and set(c.labels) <= set(LETTERS)
        assert all(1 <= v <= c.axis_max <= 90 for v in c.values)
        q = c.question
        assert q.kind != "median" or len(c.values) % 2 == 1
        assert q.kind != "above" or q.threshold not in c.values
        assert q.kind != "diff" or c.value_of(q.bars[0]) > c.value_of(q.bars[1])


# ------------------------------------------------------------------ reference solutions

READ = re.compile(r"Bar ([A-H]): (\d+)(?: ([<>]) (\d+))?\.(?: (Largest|Sorted|Count): ([\d, ]+)\.)?")


def expected_answer(c: Chart) -> int:
    q, values = c.question, sorted(c.values)
    return {
        "value": c.value_of(q.bars[0]) if q.bars else 0,
        "diff": c.value_of(q.bars[0]) - c.value_of(q.bars[-1]) if q.bars else 0,
        "top_two": values[-1] + values[-2],
        "median": values[len(values) // 2],
        "above": sum(v > q.threshold for v in values),
    }[q.kind]


def test_every_reference_solution_recomputes_from_the_charts_values() -> None:
    for item in ITEMS:
        c, steps = chart(item), list(item.steps)
        q = c.question
        assert item.question == q.text() and all("\n" not in s and s for s in steps)
        assert item.answer == expected_answer(c) and item.answer >= 0
        assert steps[-1] == f"Answer: {item.answer}"
        # the bars read: those named, in the question's order, else every bar in reading order
        names = list(q.bars) if q.kind in ("value", "diff") else list(c.labels)
        assert len(steps) == len(names) + (2 if q.kind in ("diff", "top_two", "median") else 1)
        seen: list[int] = []
        for name, step in zip(names, steps, strict=False):
            m = READ.fullmatch(step)
            assert m is not None, step
            label, value, sign, threshold, what, result = m.groups()
            assert label == name and int(value) == c.value_of(name)
            seen.append(int(value))
            if q.kind == "above":
                assert int(threshold) == q.threshold and sign == (">" if int(value) > q.threshold else "<")
                assert what == "Count" and int(result) == sum(v > q.threshold for v in seen)
            elif q.kind == "top_two":
                assert what == "Largest" and result == ", ".join(map(str, sorted(seen, reverse=True)[:2]))
            elif q.kind == "median":
                assert what == "Sorted" and result == ", ".join(map(str, sorted(seen)))
            else:
                assert sign is None and what is None
        if q.kind == "diff":
            a, b = seen
            assert steps[-2] == f"Difference: {column(a, b, -1)}." and a - b == item.answer
        elif q.kind == "top_two":
            a, b = sorted(c.values)[-1], sorted(c.values)[-2]
            assert steps[-2] == f"Sum: {column(a, b, 1)}." and a + b == item.answer
        elif q.kind == "median":
            assert steps[-2] == f"Middle: {item.answer}."


COLUMN = re.compile(r"(\d+) ([+-]) (\d+): (\d+) ([+-]) (\d) = (\d+); (\d+) ([+-]) (\d+) ([+-]) ([01]) = (\d+); (\d+)")


def test_sums_and_differences_are_worked_in_columns_on_single_digits() -> None:
    # every pair a chart can ask (values to 90, the larger first in a difference)
    for a, b in itertools.product(range(91), repeat=2):
        for sign in (1, -1):
            if sign < 0 and a < b:
                continue
            m = COLUMN.fullmatch(column(a, b, sign))
            assert m is not None, (a, b, sign)
            x, op, y, top, op1, low, units, ta, op2, tb, op3, carry, tens, result = m.groups()
            ops = "+" if sign > 0 else "-"
            assert (int(x), int(y)) == (a, b) and op == op1 == op2 == op3 == ops
            # the units: b's units digit from a's, ten more on a's side only where a difference borrows
            assert int(low) == b % 10 and int(top) in (a % 10, a % 10 + 10)
            assert int(units) == int(top) + sign * int(low) and 0 <= int(units) <= 18
            # the tens with the carry (the units' tens digit) or the borrow (the ten lent above)
            assert (int(ta), int(tb)) == (a // 10, b // 10)
            assert int(carry) == (int(units) // 10 if sign > 0 else int(int(top) >= 10))
            assert int(tens) == int(ta) + sign * (int(tb) + int(carry)) >= 0
            assert 10 * int(tens) + int(units) % 10 == int(result) == a + sign * b
    with pytest.raises(ValueError, match="a >= b >= 0"):
        column(3, 5, -1)


def test_parse_answer_reads_the_final_step_and_nothing_else() -> None:
    for item in ITEMS[:: N // 10]:
        assert TASK.parse_answer(item.steps[-1]) == item.answer
        assert TASK.parse_answer("\n".join(item.steps)) == item.answer
        assert all(TASK.parse_answer(s) is None for s in item.steps[:-1])
    assert TASK.parse_answer("Answer: 42") == 42 and TASK.parse_answer("Answer:7") == 7
    assert TASK.parse_answer("Answer: 3\nAnswer: -4") == -4 and TASK.parse_answer("Bar A: 5.") is None


# ------------------------------------------------------------------ judge items


def reference_at(item: TaskItem, prefix: list[str]) -> str:
    assert list(item.steps[: len(prefix)]) == prefix
    return item.steps[len(prefix)]


def test_judge_items_are_right_when_none_and_wrong_when_corrupted() -> None:
    rng = random.Random(0)
    kinds: Counter[str] = Counter()
    for item in ITEMS:
        for _ in range(4):
            made = TASK.judge_item(item, rng)
            assert made.item is item
            kinds[made.corruption] += 1
            reference = reference_at(item, made.prefix)
            if made.corruption == "none":
                assert made.correct and made.candidate == reference
                continue
            assert not made.correct and made.candidate != reference and "\n" not in made.candidate
            assert made.corruption in OWN_CORRUPTIONS
            c, m, ref = chart(item), READ.fullmatch(made.candidate), READ.fullmatch(reference)
            if made.corruption == "misread":
                assert m is not None and int(m.group(2)) != c.value_of(m.group(1))
            elif made.corruption == "wrong_bar":  # another bar's value, under its letter or this one's
                assert m is not None and int(m.group(2)) in c.values
                assert ref is not None and (m.group(1) != ref.group(1) or int(m.group(2)) != c.value_of(m.group(1)))
            elif made.corruption == "running":
                assert m is not None and ref is not None and m.group(1, 2) == ref.group(1, 2)
            elif made.corruption == "answer":
                assert TASK.parse_answer(made.candidate) not in (None, item.answer)
    assert set(kinds) == {"none"} | OWN_CORRUPTIONS
    assert 0.4 < kinds["none"] / kinds.total() < 0.6


def test_judge_items_follow_p_correct() -> None:
    rng = random.Random(1)
    assert all(TASK.judge_item(item, rng, p_correct=1.0).correct for item in ITEMS[:50])
    assert not any(TASK.judge_item(item, rng, p_correct=0.0).correct for item in ITEMS[:50])


def test_a_judge_item_needs_a_charts_item() -> None:
    grid_item = get_task("grid").item("val", 0)
    with pytest.raises(ConfigError, match="another task's item"):
        TASK.judge_item(grid_item, random.Random(0))
    with pytest.raises(ConfigError, match="another task's item"):
        TASK.cell_labels(grid_item)


def test_a_swapped_cell_misreads_a_value_and_leaves_the_rest() -> None:
    rng = random.Random(2)
    swapped = 0
    for item in ITEMS[:100]:
        made = TASK.judge_item(item, rng, p_correct=1.0)
        out = TASK.swap_cell(made, rng)
        if not made.candidate.startswith("Bar "):  # a step that reads no bar
            assert out is None
            continue
        swapped += 1
        assert out is not None
        old, new = READ.fullmatch(made.candidate), READ.fullmatch(out.candidate)
        assert old is not None and new is not None and out.corruption == "swap" and out.prefix == made.prefix
        assert new.group(2) != old.group(2) and new.group(1, 3, 4, 5, 6) == old.group(1, 3, 4, 5, 6)
    assert swapped > 30
    assert dict(TASK.words) == {"letter": tuple(LETTERS.lower())}


# ------------------------------------------------------------------ images


def cells_with_ink(image: Image.Image) -> set[int]:
    px = image.load()
    assert px is not None
    return {(y // CELL) * GRID + x // CELL for y in range(IMAGE_SIZE) for x in range(IMAGE_SIZE) if px[x, y] == INK}


def test_images_are_224_px_rgb_with_every_value_and_letter_inside_its_own_cell() -> None:
    for item in ITEMS[:: N // 25]:
        c = chart(item)
        assert item.image.size == (IMAGE_SIZE, IMAGE_SIZE) and item.image.mode == "RGB"
        labels = TASK.cell_labels(item)
        assert len(labels) == GRID * GRID and all(0 <= x < CELL_CLASSES for x in labels)
        text_cells = {i for i, x in enumerate(labels) if x >= 2}
        assert len(text_cells) == 2 * len(c.values)  # a value and a letter per bar, each its own cell
        assert cells_with_ink(item.image) == text_cells  # the text is drawn there and nowhere else
        for bar, value in zip(bar_boxes(c), c.values, strict=True):
            row, col = bar.value_cell
            assert labels[row * GRID + col] == 2 + len(LETTERS) + value - 1
            x0, y0, x1, y1 = bar.box
            covered = {
                r * GRID + k
                for r in range(y0 // CELL, (y1 - 1) // CELL + 1)
                for k in range(x0 // CELL, (x1 - 1) // CELL + 1)
            }
            assert all(labels[i] == 1 for i in covered) and not covered & text_cells
            # the bar's length is its value on the axis (six cells), to the pixel
            length = (x1 - x0 + 1) if c.horizontal else (y1 - y0)
            assert length == max(1, round(value * 6 * CELL / c.axis_max))


def test_off_task_warnings_are_empty_for_the_tasks_items_only() -> None:
    for item in ITEMS[:: N // 10]:
        assert TASK.off_task_warnings(item.image, item.question) == []
        assert TASK.off_task_warnings(item.image, " " + item.question.lower().rstrip("?") + " ") == []
    item = ITEMS[0]
    grid_item = get_task("grid").item("test", 0)
    blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    assert "not a chart of the charts task" in TASK.off_task_warnings(grid_item.image, item.question)[0]
    assert "not a chart of the charts task" in TASK.off_task_warnings(blank, item.question)[0]
    assert "not one the charts task asks" in TASK.off_task_warnings(item.image, grid_item.question)[0]
    assert len(TASK.off_task_warnings(grid_item.image, "How many cats are there?")) == 2
    assert TASK.off_task_warnings(item.image, "How much greater is bar C than bar C?")  # not a question it asks
    assert get_task("grid").off_task_warnings(item.image, grid_item.question)  # and the grid refuses a chart


# ------------------------------------------------------------------ what training would consume


def test_the_zoos_data_path_turns_an_item_into_64_visual_tokens_with_a_class_each() -> None:
    from dreamr_stream.zoo.build import IMAGE_TOKEN, build_processor, build_tokenizer
    from dreamr_stream.zoo.data import solution_example

    task = perception_task(get_task("charts"), needed_by="the charts models")
    processor = build_processor(build_tokenizer(corpus_size=60, task=task), task=task)
    item = TASK.item("val", 3)
    example = solution_example(processor, item)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert example.input_ids.count(image_id) == (IMAGE_SIZE // CELL) ** 2 == 64
    assert tuple(example.pixel_values.shape) == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert example.cells == TASK.cell_labels(item)
    decoded = processor.tokenizer.decode([t for t in example.labels if t >= 0], skip_special_tokens=True)
    assert decoded == "\n".join(item.steps)
