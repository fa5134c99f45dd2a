"""What SAPO and the zoo trainer share: configuration files checked field by field, one
learning-rate schedule, prompts that come from the caller, and a one-way dependency (zoo uses
sapo, never the reverse)."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from dreamr_stream.config import GenerationConfig
from dreamr_stream.errors import ConfigError
from dreamr_stream.sapo.config import SapoConfig
from dreamr_stream.sapo.prompts import TrajectoryCache, held_out
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.sapo.trajectories import greedy_writes
from dreamr_stream.tasks import get_task
from dreamr_stream.tasks.grid.puzzles import make_puzzle, split_seed
from dreamr_stream.training import TrainingConfig, save_atomic
from dreamr_stream.zoo.build import DRAFT_SHAPE
from dreamr_stream.zoo.judge_layers import JudgeLayersConfig
from dreamr_stream.zoo.prompts import TaskPrompts
from dreamr_stream.zoo.train import TrainConfig, lr_at

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "dreamr_stream" / "zoo" / "configs").glob("*.json")) + sorted(
    (ROOT / "benchmarks" / "configs").glob("*.json")
)
SHAPE = {"hidden": 8, "layers": 1, "heads": 2, "intermediate": 16}


def _config_class(raw: dict[str, Any]) -> type[TrainingConfig]:
    if "shape" in raw:
        return TrainConfig
    return JudgeLayersConfig if "new_layers" in raw else SapoConfig


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_committed_config_file_loads_with_its_values(path: Path) -> None:
    raw = json.loads(path.read_text())
    dumped = _config_class(raw).from_json(path).model_dump()
    assert {k: dumped[k] for k in raw} == raw


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"group_size": 0}, "group_size"),
        ({"lr_rate": 1e-4}, "lr_rate"),  # a misspelt field is an error, not a silent default
        ({"verify_mode": "judges"}, "verify_mode"),
        ({"generation": {"step_delimiter": ""}}, "generation.step_delimiter"),
        ({"weights": {"faith": -1.0}}, "weights.faith"),
        ({"name": "x", "shape": {"hidden": 8, "layers": 1, "heads": 2}}, "shape.intermediate"),
        ({"name": "x", "shape": SHAPE, "steps": "many"}, "steps"),
        ({"name": "x", "shape": SHAPE, "min_lr_frac": 1.5}, "min_lr_frac"),
    ],
)
def test_a_bad_config_file_is_an_error_naming_the_file_and_the_field(
    tmp_path: Path, fields: dict[str, Any], named: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ConfigError) as e:
        _config_class(fields).from_json(path)
    # a nested field is named by each model on its path (the outer one, then the inner one's error)
    assert str(path) in str(e.value) and all(part in str(e.value) for part in named.split("."))


@pytest.mark.parametrize("text", ["{", "[1, 2]"])
def test_a_config_file_that_is_not_an_object_of_fields_is_an_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.json"):
        SapoConfig.from_json(path)


def test_configs_are_frozen() -> None:
    cfg = SapoConfig()
    with pytest.raises(ValidationError):
        cfg.steps = 3  # type: ignore[misc]
    assert cfg.model_copy(update={"steps": 3}).steps == 3 and cfg.steps == 160


def test_zoo_schedule_warms_up_then_falls_on_a_cosine_to_its_floor() -> None:
    cfg = TrainConfig(name="x", shape=DRAFT_SHAPE, lr=1e-3, warmup=4, steps=14, min_lr_frac=0.2)
    rates = [lr_at(cfg, s) for s in range(20)]
    assert rates[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])  # the cosine starts after the warm-up
    assert rates[9] == pytest.approx(1e-3 * (0.2 + 0.8 * 0.5))  # half way down
    assert all(a > b for a, b in itertools.pairwise(rates[4:15]))
    assert rates[14:] == pytest.approx([2e-4] * 6)  # the floor from the last step on


def _prompt(key: str, k: int) -> RolloutPrompt:
    return RolloutPrompt(Image.new("RGB", (8, 8)), "q", [f"step {i}" for i in range(k + 1)], key=key, start=k)


def test_log_prompts_are_held_out_by_whole_puzzles() -> None:
    prompts = [_prompt(f"p{i % 5}", i // 5) for i in range(15)]  # 5 puzzles, 3 prefixes each
    split = held_out(prompts, 4, seed=0)(None, TrajectoryCache())  # type: ignore[arg-type]
    val, train = {p.key for p in split.val}, {p.key for p in split.train}
    assert not val & train and val | train == {f"p{i}" for i in range(5)}
    assert len(split.val) == 6  # two whole puzzles: the first two that reach 4 prompts
    assert list(split.train) == [p for p in prompts if p.key in train]  # in the log's order
    # one puzzle: nothing is left to hold out, and all of it is trained on
    one = held_out(prompts[:1] + prompts[5:6], 4)(None, TrajectoryCache())  # type: ignore[arg-type]
    assert not one.val and len(one.train) == 2


def test_task_prompts_compute_a_trajectory_only_when_drawn() -> None:
    steps = ["Row 1: empty.", "Answer: 0"]
    cache = TrajectoryCache()
    cache.items["train:3"] = steps
    prompts = TaskPrompts(None, cache, "train", 1000, GenerationConfig())  # type: ignore[arg-type]
    assert len(prompts) == 1000 and prompts[3].steps == steps and prompts[3].key == "train:3"
    assert prompts[3].question == make_puzzle(split_seed("train", 3)).question.text()
    assert list(prompts.items) == [3] and list(cache.items) == ["train:3"]


def test_the_answer_prefix_comes_from_the_generation_config() -> None:
    puzzle = make_puzzle(3)
    other = GenerationConfig(answer_prefix="Result:")
    # a trajectory must end with the configured prefix: no model call is needed to say no
    assert not greedy_writes(None, puzzle.image, puzzle.question.text(), puzzle.steps(), gen=other)  # type: ignore[arg-type]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    froms = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    return froms + [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]


def test_sapo_does_not_import_the_zoo() -> None:
    for path in (ROOT / "dreamr_stream" / "sapo").glob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("dreamr_stream.zoo")], path.name


def test_a_judge_stage_names_the_layers_its_auxiliary_losses_read() -> None:
    from dreamr_stream.errors import ConfigError

    with pytest.raises(ConfigError, match="flag_weight > 0 needs flag_layer"):
        TrainConfig(name="x", shape=DRAFT_SHAPE, flag_weight=1.0)
    with pytest.raises(ConfigError, match=r"early_exit_layer 2: the model has decoder layers 0\.\.1"):
        TrainConfig(name="x", shape=DRAFT_SHAPE, early_exit_weight=0.5, early_exit_layer=2)
    assert TrainConfig(name="x", shape=DRAFT_SHAPE, flag_weight=1.0, flag_layer=1).flag_layer == 1


def test_a_grown_model_computes_what_the_original_did_and_trains_only_its_new_layers(tmp_path: Path) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    from dreamr_stream.zoo.build import build_model, grow_decoder
    from dreamr_stream.zoo.data import collate, solution_example
    from dreamr_stream.zoo.train import load_or_build_processor, train

    processor = load_or_build_processor(tmp_path / "processor")
    shape = {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "vision_hidden": 16}
    start = build_model(processor.tokenizer, TrainConfig(name="x", shape=shape).shape, seed=0)
    start.save_pretrained(tmp_path / "start")
    batch = collate([solution_example(processor, get_task().item("val", 0))], processor.tokenizer.pad_token_id)

    def logits(model: LlavaForConditionalGeneration) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits

    grown = LlavaForConditionalGeneration.from_pretrained(tmp_path / "start", dtype=torch.float32)
    assert grow_decoder(grown, 3, seed=0) == 1  # train() grows with cfg.seed, 0
    assert torch.equal(logits(grown), logits(start))  # new layers start as the identity
    with pytest.raises(ValueError, match="cannot grow a 3-layer"):
        grow_decoder(grown, 2, seed=0)

    cfg = TrainConfig(
        name="grown",
        shape={**shape, "layers": 3},
        init_from=str(tmp_path / "start"),
        train_only_new_layers=True,
        steps=2,
        batch_size=2,
        warmup=0,
        lr=1e-2,
        eval_size=2,
        flag_weight=1.0,
        flag_layer=2,
        flag_labels="own_choice",
        judge_fraction=0.5,
        threads=1,
    )
    final = LlavaForConditionalGeneration.from_pretrained(train(cfg, tmp_path / "run", tmp_path / "processor"))
    assert final.config.text_config.num_hidden_layers == 3
    before, after = start.state_dict(), final.state_dict()
    new = [k for k in after if ".layers.1." in k or ".layers.2." in k]
    assert new and all(k not in before for k in new)
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen weight moved"
    assert any(not torch.equal(after[k], grown.state_dict()[k]) for k in new), "the new layers did not learn"


def test_only_a_model_started_from_another_can_train_only_new_layers() -> None:
    with pytest.raises(ConfigError, match="train_only_new_layers needs init_from"):
        TrainConfig(name="x", shape=DRAFT_SHAPE, train_only_new_layers=True)


def test_own_choice_flags_mark_where_a_supervised_token_is_the_greedy_choice_before_it() -> None:
    import torch

    from dreamr_stream.zoo.data import IGNORE, Batch
    from dreamr_stream.zoo.train import own_choice_flags

    ids = torch.tensor([[5, 1, 2, 3]])
    logits = torch.zeros(1, 4, 8)
    logits[0, 0, 1] = logits[0, 1, 7] = logits[0, 2, 3] = 1.0  # greedy after each: 1, 7, 3
    flags = torch.tensor([[IGNORE, 1, 1, IGNORE]])  # supervised at tokens 1 and 2 only
    batch = Batch(ids, torch.ones_like(ids), ids, torch.zeros(1, 3, 2, 2), torch.zeros(1, 1), flags)
    assert own_choice_flags(logits, batch).tolist() == [[IGNORE, 1, 0, IGNORE]]


def test_save_atomic_writes_the_state_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    save_atomic({"step": 3, "w": torch.ones(2)}, path)
    save_atomic({"step": 4, "w": torch.zeros(2)}, path)  # replaces the earlier one
    state = torch.load(path, weights_only=False)
    assert state["step"] == 4 and state["w"].tolist() == [0.0, 0.0]
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
