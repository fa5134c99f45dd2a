"""The task seam: a second task is one module plus its models; nothing else changes.

``tests/task_support.py`` defines the digits task in a few lines and scripted models of it. Here
it is registered by name and run through the bench, the evaluation and the demo page's puzzle
route, none of which knows it. The grid task, seen through the seam, gives exactly the puzzles
that the grid's own functions give (so every committed figure's command draws the same ones).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from dreamr_websocket.routes import DemoPuzzle
from task_support import QUESTION, DigitsModel, DigitsTask, sum_is_wrong
from ws_support import ask, client, http_get, serving, until_terminal

from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.bench import run_bench
from dreamr_stream.config import CacheConfig, ReasonerConfig
from dreamr_stream.inputs import load_image
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks import SPLITS, Split, Task, TaskItem, as_task, get_task, items, register_task, task_names
from dreamr_stream.tasks.grid.puzzles import make_judge_item, make_puzzle, split_seed
from dreamr_stream.zoo.evaluate import evaluate_method

N = 8  # test items the scripted models have seen


class RecordingDigits(DigitsTask):
    """The digits task, noting which items were asked for and how many answers it read."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []
        self.parsed = 0

    def item(self, split: Split, index: int) -> TaskItem:
        self.asked.append((split, index))
        return super().item(split, index)

    def parse_answer(self, text: str) -> int | None:
        self.parsed += 1
        return super().parse_answer(text)


@pytest.fixture(scope="module")
def digits() -> Task:
    register_task(DigitsTask())
    return get_task("digits")


def digits_reasoner(task: Task) -> Reasoner:
    """The digits task's models: a target that is right, a draft that gets some sums wrong."""
    target = DigitsModel(task, "test", N, name="target")
    draft = DigitsModel(task, "test", N, name="draft", wrong_sums=True)
    return Reasoner(target, draft, config=ReasonerConfig(cache=CacheConfig(enabled=False)))


# ------------------------------------------------------------------ the seam


@pytest.mark.parametrize("split", SPLITS)
def test_grid_items_are_the_grid_puzzles_of_each_split(split: Split) -> None:
    grid = get_task()
    for index in (0, 7, 123):
        item, puzzle = grid.item(split, index), make_puzzle(split_seed(split, index), hard=split == "hard")
        assert item.source == puzzle and item.key == f"grid/{split}/{index}"
        assert (item.question, list(item.steps), item.answer) == (puzzle.question.text(), puzzle.steps(), puzzle.answer)
        assert item.image.tobytes() == puzzle.image.tobytes()
        assert grid.parse_answer("\n".join(item.steps)) == item.answer


def test_grid_judge_items_are_the_grid_judge_items() -> None:
    grid = get_task("grid")
    ours, theirs = random.Random(5), random.Random(5)
    for index in range(40):
        item = grid.item("train", index)
        made, expected = grid.judge_item(item, ours), make_judge_item(item.source, theirs)  # type: ignore[arg-type]
        assert made.item is item and made.correct == expected.correct
        assert (made.prefix, made.candidate) == (expected.prefix, expected.candidate)
        assert made.corruption == expected.corruption


def test_a_task_is_found_by_name_or_passed_as_itself(digits: Task) -> None:
    assert isinstance(digits, Task) and {"grid", "digits"} <= set(task_names())
    assert as_task("digits") is digits and as_task(digits) is digits and as_task() is get_task("grid")
    taken = list(items("digits", "val", 3, start=5))
    assert [i.index for i in taken] == [5, 6, 7] and taken == [digits.item("val", i) for i in (5, 6, 7)]
    item = digits.item("test", 2)
    assert item.question == QUESTION and digits.parse_answer(item.steps[-1]) == item.answer
    assert digits.off_task_warnings(item.image, item.question) == []
    assert digits.off_task_warnings(item.image, "How many red shapes are there?")
    kinds = {digits.judge_item(item, random.Random(s)).corruption for s in range(20)}
    assert kinds == {"none", "arithmetic"}


# ------------------------------------------------------------------ the bench, the evaluation, the page


@pytest.mark.slow
def test_the_bench_measures_a_tasks_test_items() -> None:
    """The bench's rows need model folders: the shipped draft stands in for target and draft. Its
    answers are not the point; the items and the answer check are the task's."""
    task = RecordingDigits()
    draft = demo_paths().draft
    methods = ("target_only", "target_generate", "sequential_sft")
    result = run_bench(target_dir=draft, sft_dir=draft, sapo_dir=None, n=3, methods=methods, task=task)
    assert result.config["task"] == "digits" and list(result.methods) == list(methods)
    assert task.asked[0] == ("val", 0)  # the cost probe and the warm-up
    assert [a for a in task.asked if a[0] == "test"] == [("test", i) for i in range(3)]
    assert task.parsed == 3  # the generate() row's answers, read by the task
    for row in result.methods.values():
        assert len(row["wall_s"]) == 3 and 0.0 <= row["accuracy"] <= 1.0


def test_the_evaluation_reads_a_tasks_items_and_answers(digits: Task) -> None:
    reasoner = digits_reasoner(digits)
    wrong = [i for i in range(N) if sum_is_wrong(digits.item("test", i))]
    assert 0 < len(wrong) < N  # the draft is wrong on some items, right on the others
    try:
        fpsr = evaluate_method(reasoner, "fpsr", "test", N, task="digits")
        alone = evaluate_method(reasoner, "draft_only", "test", N, task=digits)
    finally:
        reasoner.close()
    assert fpsr.accuracy == 1.0 and fpsr.wrong == [] and fpsr.acceptance is not None and fpsr.acceptance < 1.0
    assert alone.wrong == wrong and alone.accuracy == 1 - len(wrong) / N


@pytest.mark.slow
def test_zoo_eval_and_tbvm_take_a_task_by_name(digits: Task, tmp_path: Path) -> None:
    from dreamr_stream.zoo import evaluate, tbvm_eval

    draft = str(demo_paths().draft)  # any model folder: the items and judge items are what is checked
    args = ["--target", draft, "--task", "digits", "--judge-n", "4", "--json", str(tmp_path / "eval.json")]
    evaluate.main([*args, "--methods", "", "--draft", draft, "--prefixes", "1"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["task"] == "digits" and report["prefixes"]["puzzles"] == 1
    for mode in report["tbvm"]["judge_set"].values():
        assert mode["n"] == 4 and set(mode["accept_by_kind"]) <= {"none", "arithmetic"}
    assert all(r["n"] >= 1 for r in report["tbvm"]["draft_steps"].values())  # the target's own steps there
    args = ["--target", draft, "--task", "digits", "--judge-n", "4", "--prefixes", "0"]
    tbvm_eval.main([*args, "--json", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text())["items"] == 4


@pytest.mark.asyncio
async def test_the_demo_page_serves_an_item_of_a_task_and_its_models_answer_it(digits: Task) -> None:
    # a task's models that declare no task are served under the task's name
    async with serving({"digits": digits_reasoner(digits)}) as server:
        status, _, body = await http_get(server, "/puzzle?task=digits&seed=3")
        puzzle = DemoPuzzle.model_validate_json(body)
        item = digits.item("test", 3)
        assert status == 200 and (puzzle.task, puzzle.seed, puzzle.question) == ("digits", 3, item.question)
        assert puzzle.answer == str(item.answer)
        assert load_image(puzzle.image).tobytes() == item.image.tobytes()
        async with client(server) as ws:  # what the page does with it: ask, and compare the answer
            await ws.send(ask(question=puzzle.question, image=puzzle.image))
            messages = await until_terminal(ws)
        assert next(m for m in messages if m["type"] == "answer")["answer"] == puzzle.answer
        status, _, body = await http_get(server, "/puzzle?seed=3")  # the served (default) task unless told
        assert status == 200 and DemoPuzzle.model_validate_json(body).task == "digits"
        for other in ("nonesuch", "grid"):  # a puzzle only of a served task: no model here answers another's
            status, _, body = await http_get(server, f"/puzzle?task={other}")
            assert status == 400 and b"serves digits" in body
