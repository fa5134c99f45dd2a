"""The trainer's digit ties (``zoo.digits``) and its focus on some steps (``TrainConfig.focus_*``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import get_task
from dreamr_stream.training import load_checkpoint
from dreamr_stream.zoo.build import build_model
from dreamr_stream.zoo.data import collate, solution_example
from dreamr_stream.zoo.digits import PLACES, DigitTies, number_tokens
from dreamr_stream.zoo.train import TrainConfig, has_focus, load_or_build_processor, train

SHAPE = {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32, "vision_hidden": 16}


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> LlavaProcessor:
    return load_or_build_processor(tmp_path_factory.mktemp("processor"))


def _model(processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    return build_model(processor.tokenizer, TrainConfig(name="x", shape=SHAPE).shape, seed=0).eval()


def _logits(model: LlavaForConditionalGeneration, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_number_tokens_are_the_tokens_that_are_whole_numbers(processor: LlavaProcessor) -> None:
    tok = processor.tokenizer
    numbers = number_tokens(tok)
    assert numbers, "the grid tokenizer writes counts"
    for token_id, value in numbers.items():
        assert tok.decode([token_id]).strip() == str(value)
    others = set(range(len(tok))) - set(numbers)
    assert not any(tok.decode([i]).strip().isdecimal() for i in others)


def test_a_number_token_is_moved_by_one_shared_vector_per_place(processor: LlavaProcessor) -> None:
    model = _model(processor)
    ties = DigitTies(processor.tokenizer, SHAPE["hidden"])
    ties.attach(model)
    numbers = number_tokens(processor.tokenizer)
    with torch.no_grad():
        ties.table.normal_()
    delta = ties.delta()
    for token_id, value in numbers.items():
        want = sum(ties.table[10 * p + value // 10**p % 10] for p in range(PLACES))
        assert torch.allclose(delta[token_id], want)
    assert delta[[i for i in range(len(processor.tokenizer)) if i not in numbers]].abs().sum() == 0


def test_ties_change_nothing_until_they_learn_and_fold_into_a_plain_checkpoint(
    processor: LlavaProcessor, tmp_path: Path
) -> None:
    model = _model(processor)
    number = next(iter(number_tokens(processor.tokenizer)))
    ids = torch.tensor([[3, number, 7, number]])
    before = _logits(model, ids)
    ties = DigitTies(processor.tokenizer, SHAPE["hidden"])
    ties.attach(model)
    assert torch.equal(_logits(model, ids), before)  # a zero table
    with torch.no_grad():
        ties.table.normal_()
    tied = _logits(model, ids)
    assert not torch.allclose(tied, before)  # in the input embeddings and the tied LM head
    ties.fold(model)
    assert ties.table.abs().sum() == 0
    assert torch.allclose(_logits(model, ids), tied, atol=1e-5)
    model.save_pretrained(tmp_path / "folded")
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "folded", dtype=torch.float32).eval()
    assert torch.allclose(_logits(plain, ids), tied, atol=1e-5)


def test_ties_refuse_a_model_whose_head_is_not_its_embeddings(processor: LlavaProcessor) -> None:
    model = _model(processor)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tied"):
        DigitTies(processor.tokenizer, SHAPE["hidden"]).attach(model)


def test_focus_needs_prefixes_and_an_item_has_focus_when_a_step_starts_so() -> None:
    with pytest.raises(ConfigError, match="focus_fraction > 0 needs focus_prefixes"):
        TrainConfig(name="x", shape=SHAPE, focus_fraction=0.5)
    item = get_task("charts").item("val", 3)  # How much greater is bar A than bar E?
    assert has_focus(item, ["Difference:"]) and has_focus(item, ["Sum:", "Difference:"])
    assert not has_focus(item, ["Sum:"])


def test_a_run_with_ties_and_focus_trains_its_focus_and_saves_plain_checkpoints(
    processor: LlavaProcessor, tmp_path: Path
) -> None:
    start = _model(processor)
    start.save_pretrained(tmp_path / "start")
    cfg = TrainConfig(
        name="ties",
        shape=SHAPE,
        init_from=str(tmp_path / "start"),
        digit_ties=True,
        focus_prefixes=["Row 4:"],
        focus_fraction=1.0,
        steps=2,
        batch_size=2,
        warmup=0,
        lr=1e-2,
        eval_size=4,
        eval_every=1,
        threads=1,
    )
    final = LlavaForConditionalGeneration.from_pretrained(train(cfg, tmp_path / "run", tmp_path / "processor"))
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "val_focus_step_acc" in e] == [1, 2]
    # the table learned, and was folded into the model before it was saved: zero in the last
    # checkpoint, whose model weights are the saved model's
    state = load_checkpoint(tmp_path / "run" / "checkpoint" / "state.pt")
    assert state["aux"]["digits.table"].abs().sum() == 0
    moments = [s["exp_avg"] for s in state["opt"]["state"].values() if s["exp_avg"].shape == (10 * PLACES, 16)]
    assert moments and moments[0].abs().sum() > 0
    saved = final.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state["model"].items() if k in saved)
    item = get_task().item("val", 0)
    batch = collate([solution_example(processor, item)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.isfinite(final(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits).all()


def test_without_a_focus_the_items_drawn_are_those_drawn_before_focus_existed() -> None:
    from dreamr_stream.zoo.task_needs import draw
    from dreamr_stream.zoo.train import _draw_item

    cfg = TrainConfig(name="x", shape=SHAPE, hard_fraction=0.3)
    ours, before = random.Random(7), random.Random(7)
    for _ in range(20):
        item = _draw_item(cfg, get_task(), "train", ours)  # type: ignore[arg-type]
        # the trainer's draw as it was: an index, then whether hard
        assert item == draw(get_task(), "train", before.randrange(10**9), hard=before.random() < cfg.hard_fraction)
    assert ours.getstate() == before.getstate()


def test_a_focus_no_item_has_is_an_error_naming_it() -> None:
    from dreamr_stream.zoo.train import _draw_item

    cfg = TrainConfig(name="x", shape=SHAPE, focus_prefixes=["Nowhere:"], focus_fraction=1.0)
    with pytest.raises(ConfigError, match="Nowhere:"):
        _draw_item(cfg, get_task(), "train", random.Random(0))  # type: ignore[arg-type]
