"""The zoo on the task seam: it draws the very puzzles it drew before tasks had a seam (so runs and
committed figures reproduce), asks a task for what only some tasks have (hard items in every
split, labelled cells, swappable words) and refuses a task without what a stage needs; exported
and shipped models name their task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image
from transformers import LlavaProcessor

from dreamr_stream.backends.shipped import WEIGHTS, demo_paths, shipped_drafts, shipped_models
from dreamr_stream.errors import ConfigError, ModelLoadError
from dreamr_stream.tasks import JudgeItem, Split, TaskItem, get_task, register_task
from dreamr_stream.tasks.grid.puzzles import COLOURS, SHAPES, make_puzzle, split_seed
from dreamr_stream.zoo.build import ModelShape, build_model
from dreamr_stream.zoo.data import judge_item_example, solution_example
from dreamr_stream.zoo.draft_steps import DraftStep, read_pool
from dreamr_stream.zoo.export import export_model
from dreamr_stream.zoo.judge_layers import judge_items, swap_cell, swap_word
from dreamr_stream.zoo.task_needs import MixedTask, PerceptionTask, SwapTask, draw, perception_task
from dreamr_stream.zoo.train import TrainConfig, train

GRID = get_task("grid")


class PlainTask:
    """A task with nothing beyond the seam: one kind of item, no cells, no word groups."""

    name = "zoo-plain-test"
    title = "say the index"

    def item(self, split: Split, index: int) -> TaskItem:
        steps = (f"The index is {index}.", f"Answer: {index}")
        return TaskItem(self.name, split, index, Image.new("RGB", (8, 8)), "Which index?", steps, index)

    def parse_answer(self, text: str) -> int | None:
        return int(text.rsplit(" ", 1)[-1]) if text.startswith("Answer: ") else None

    def off_task_warnings(self, image: Image.Image, question: str) -> list[str]:
        return []

    def judge_item(self, item: TaskItem, rng: random.Random, p_correct: float = 0.5) -> JudgeItem:
        k = rng.randrange(len(item.steps))
        if rng.random() < p_correct:
            return JudgeItem(item, list(item.steps[:k]), item.steps[k], "none")
        return JudgeItem(item, list(item.steps[:k]), item.steps[k].replace(str(item.index), "x"), "wrong")


@pytest.fixture(scope="module")
def plain() -> PlainTask:
    task = PlainTask()
    register_task(task)
    return task


@pytest.mark.parametrize("split", ["train", "val", "test", "hard"])
def test_the_grid_task_draws_the_puzzles_the_zoo_drew_before(split: Split) -> None:
    for i in range(5):
        for hard in (False, True):
            mixed = GRID.mixed_item(split, i, hard=hard)  # type: ignore[attr-defined]
            puzzle = make_puzzle(split_seed(split, i), hard=hard)
            assert mixed.source == puzzle and mixed.steps == tuple(puzzle.steps()) and mixed.key == f"grid/{split}/{i}"
            assert draw(GRID, split, i, hard=hard) == mixed
        assert GRID.item(split, i).source == make_puzzle(split_seed(split, i), hard=split == "hard")


def test_the_grid_task_has_what_the_zoo_needs() -> None:
    assert isinstance(GRID, MixedTask) and isinstance(GRID, PerceptionTask) and isinstance(GRID, SwapTask)
    assert GRID.image_size == GRID.cell_size * 4
    assert dict(GRID.words) == {"colour": tuple(COLOURS), "shape": SHAPES}
    item = GRID.item("val", 2)
    labels = GRID.cell_labels(item)
    puzzle = item.source
    cells = [c for row in puzzle.grid for c in row]  # type: ignore[attr-defined]
    assert len(labels) == 16 and all(0 <= x < GRID.cell_classes for x in labels)
    assert [x == 0 for x in labels] == [c is None for c in cells]
    assert len({x for x, c in zip(labels, cells, strict=True) if c is not None}) == len({c for c in cells if c})
    with pytest.raises(ConfigError, match="another task's item"):
        GRID.cell_labels(PlainTask().item("val", 0))


def test_a_task_without_the_extras_gets_plain_items_and_swaps_and_is_refused_where_a_stage_needs_them(
    plain: PlainTask,
) -> None:
    assert not any(isinstance(plain, need) for need in (MixedTask, PerceptionTask, SwapTask))
    assert draw(plain, "train", 3, hard=True) == plain.item("train", 3)
    items = judge_items("val", 30, seed=1, swap_fraction=1.0, task=plain)
    assert {i.item.task for i in items} == {plain.name} and any(i.corruption == "swap" for i in items)
    swapped = swap_word(
        plain.judge_item(plain.item("val", 5), random.Random(0), p_correct=1.0), random.Random(1), ["a"]
    )
    assert swapped.corruption == "swap" and swapped.item.task == plain.name
    with pytest.raises(ConfigError, match="cell_swap_fraction > 0 needs a task with swappable words and cells"):
        judge_items("val", 3, seed=1, swap_fraction=1.0, cell_swap_fraction=0.5, task=plain)
    with pytest.raises(ConfigError, match="a cell swap needs"):
        swap_cell(items[0], random.Random(0))
    with pytest.raises(ConfigError, match="the demo processor needs a task whose image is a grid of labelled cells"):
        perception_task(plain, needed_by="the demo processor")


def test_examples_carry_cell_labels_only_for_a_task_with_cells(plain: PlainTask) -> None:
    processor = LlavaProcessor.from_pretrained(WEIGHTS / "target")
    grid_item = GRID.item("val", 0)
    assert solution_example(processor, grid_item).cells == GRID.cell_labels(grid_item)  # type: ignore[attr-defined]
    plain_item = plain.item("val", 4)
    example, correct = judge_item_example(processor, plain.judge_item(plain_item, random.Random(0), p_correct=1.0))
    assert correct and example.cells == [] and solution_example(processor, plain_item).cells == []


def test_the_zoo_trainer_refuses_a_task_without_cells_before_writing_anything(tmp_path: Path, plain: PlainTask) -> None:
    shape = {"hidden": 8, "layers": 1, "heads": 2, "intermediate": 16}
    with pytest.raises(ConfigError, match="the zoo trainer needs"):
        train(TrainConfig(name="x", shape=shape, task=plain.name), tmp_path / "run", tmp_path / "processor")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        train(TrainConfig(name="x", shape=shape, task="nope"), tmp_path / "run", tmp_path / "processor")


def test_a_draft_step_pool_from_before_task_names_is_the_grids(tmp_path: Path) -> None:
    fields = {"split": "train", "index": 7, "hard": True, "k": 1, "text": "x", "correct": False}
    (tmp_path / "pool.jsonl").write_text(json.dumps({**fields, "draft": "d", "temperature": 1.0}) + "\n")
    (step,) = read_pool(tmp_path / "pool.jsonl")
    assert step.task == "grid" and step == DraftStep(**fields, draft="d", temperature=1.0, task="grid")  # type: ignore[arg-type]
    puzzle = make_puzzle(split_seed("train", 7), hard=True)
    item = step.judge_item()
    assert item.item.source == puzzle and item.prefix == puzzle.steps()[:1] and item.corruption == "draft"


def test_an_exported_model_names_its_task(tmp_path: Path) -> None:
    processor = LlavaProcessor.from_pretrained(WEIGHTS / "target")
    tiny = ModelShape(hidden=8, layers=1, heads=2, intermediate=16, vision_hidden=8)
    build_model(processor.tokenizer, tiny, seed=0).save_pretrained(tmp_path / "ckpt")
    out = export_model(tmp_path / "ckpt", WEIGHTS / "target", tmp_path / "model", verify_mode="likelihood", tau=0.25)
    sidecar = json.loads((out / "dreamr.json").read_text())
    assert sidecar["task"] == "grid" and list(sidecar) == ["task", "judge", "verification"]
    with pytest.raises(ConfigError, match="unknown task"):
        export_model(tmp_path / "ckpt", WEIGHTS / "target", tmp_path / "other", task="nope")
    assert not (tmp_path / "other").exists()


def test_shipped_models_are_listed_per_task() -> None:
    assert shipped_models("grid") == ["draft-sapo", "draft-sft", "target", "target-judge"]
    assert shipped_models("charts") == ["charts-draft-sft", "charts-target"]
    assert shipped_models() == sorted(shipped_models("grid") + shipped_models("charts"))
    assert shipped_models("nope") == [] and shipped_drafts() == shipped_drafts("grid") == ["sapo", "sft"]
    assert demo_paths("sft") == demo_paths("sft", task="grid") and demo_paths().draft == WEIGHTS / "draft-sapo"
    with pytest.raises(ModelLoadError, match="no shipped demo models for task 'nope' \\(shipped: charts, grid\\)"):
        demo_paths(task="nope")
