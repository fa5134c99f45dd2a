"""The judge-layers stage: its cached-trunk training computes what the grown target computes, its
labels are the likelihood mode's own decisions, and a stage trains, resumes and saves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.shipped import WEIGHTS
from dreamr_stream.config import VerificationConfig
from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import JudgeItem, get_task
from dreamr_stream.verify import make_verifier
from dreamr_stream.zoo.build import ModelShape, build_model, grow_decoder
from dreamr_stream.zoo.data import STEP_DELIMITER, judge_item_example
from dreamr_stream.zoo.judge_layers import (
    JudgeLayers,
    JudgeLayersConfig,
    cache_trunk,
    judge_items,
    likelihood_labels,
    pad,
    swap_cell,
    swap_word,
    train,
)

TARGET = WEIGHTS / "target"
GRID = get_task("grid")
TINY = ModelShape(hidden=32, layers=2, heads=2, intermediate=64, vision_hidden=32)


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    return LlavaProcessor.from_pretrained(TARGET)


def _tiny(processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    return build_model(processor.tokenizer, TINY, seed=0).eval()


@pytest.mark.parametrize("trainable_top", [0, 1])
def test_the_new_layers_on_a_cached_trunk_compute_what_the_grown_model_computes(
    processor: LlavaProcessor, trainable_top: int
) -> None:
    """Also with the target's own top layer trained beside the new ones (the trunk cached below it)."""
    model = _tiny(processor)
    items = judge_items("val", 5, seed=3, swap_fraction=0.5)
    trunk = cache_trunk(model, processor, items, batch=2, dtype=torch.float32, below_top=trainable_top)
    first = grow_decoder(model, TINY.layers + 3, seed=1)
    torch.manual_seed(2)
    for layer in model.model.language_model.layers[first:]:  # away from the identity
        for p in layer.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    judge = JudgeLayers(model, first, flag_after=0, first_trained=first - trainable_top).eval()
    assert len(judge.layers) == 3 + trainable_top and judge.new_from == trainable_top
    batch = pad(trunk)
    with torch.no_grad():
        mine = judge(batch.trunk)["logits"]
        examples = [judge_item_example(processor, it)[0] for it in items]
        # cache_trunk orders by length: match each cached item to its example by its tokens
        by_ids = {tuple(e.input_ids[:-1]): e for e in examples}
        pixels = torch.stack([by_ids[tuple(t.ids.tolist())].pixel_values for t in trunk])
        full = model(input_ids=batch.ids, attention_mask=batch.real.long(), pixel_values=pixels).logits
    assert torch.allclose(mine[batch.real], full[batch.real], atol=1e-4)


@pytest.mark.parametrize("trainable_top", [0, 8])
def test_the_labels_are_the_likelihood_modes_decisions(processor: LlavaProcessor, trainable_top: int) -> None:
    """On the shipped target: the verdict's label for a candidate is what the engine's likelihood
    verifier decides on the backend's score of it, and so is each token's flag."""
    rng = random.Random(5)
    words = ["red", "blue", "circle", "square", "Row", "empty"]
    items = []
    for i in range(8):
        item = GRID.judge_item(GRID.item("val", 300 + i), rng)
        items.append(swap_word(item, rng, words) if item.correct and i % 2 else item)
    tau = 0.25
    backend = TransformersBackend.from_pretrained(TARGET, device="cpu")
    verifier = make_verifier(VerificationConfig(mode="likelihood", tau=tau))
    engine = []
    for item in items:
        session = backend.open_session(item.item.image, item.item.question)
        for step in item.prefix:
            backend.append(session, step, stop=STEP_DELIMITER)
        score = backend.score(session, item.candidate, stop=STEP_DELIMITER, judge=backend.judge)
        backend.close(session)
        engine.append(verifier.verify(score.p_pos, score.p_neg, score.token_logprobs).accepted)
    model = backend.model
    # the labels come from the frozen target's last layer also where the trunk is cached below it
    trunk = cache_trunk(model, processor, items, dtype=torch.float32, below_top=trainable_top)
    first = grow_decoder(model, len(model.model.language_model.layers) + 3, seed=0)
    batch = pad(trunk)
    labels = likelihood_labels(JudgeLayers(model, first, 0).frozen_logprobs(batch.top), batch, tau / (1 + tau))
    by_ids = {tuple(t.ids.tolist()): a for t, a in zip(trunk, labels.accept.tolist(), strict=True)}
    mine = [by_ids[tuple(judge_item_example(processor, it)[0].input_ids[:-1])] for it in items]
    assert mine == engine
    assert 0 < sum(engine) < len(engine), "the items should hold accepted and rejected candidates"
    # the per-token flags gather to the verdict: a candidate passes iff every text token does
    per_row = (labels.token_ok | ~batch.counted).all(1)
    assert per_row.tolist() == labels.accept.tolist()


def _tiny_target(tmp_path: Path, processor: LlavaProcessor) -> Path:
    folder = tmp_path / "tiny-target"
    _tiny(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "dreamr.json").write_text(json.dumps({"verification": {"mode": "likelihood", "tau": 0.25}}))
    return folder


def test_a_stage_trains_resumes_and_saves_the_grown_target(tmp_path: Path, processor: LlavaProcessor) -> None:
    fields = {
        "name": "tiny-judge",
        "init_from": str(_tiny_target(tmp_path, processor)),
        "new_layers": 3,
        "flag_after": 0,
        "steps": 2,
        "batch_size": 4,
        "warmup": 1,
        "judge_items": 12,
        "val_items": 6,
        "eval_every": 2,
    }
    out = tmp_path / "run"
    train(JudgeLayersConfig(**fields), out)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "verdict_vs_likelihood" in r] == [2]
    final = train(JudgeLayersConfig(**{**fields, "steps": 4}), out)  # resumes at step 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "verdict_vs_likelihood" in r] == [2, 4]
    grown = LlavaForConditionalGeneration.from_pretrained(final)
    assert len(grown.model.language_model.layers) == TINY.layers + 3
    assert grown.config.text_config.num_hidden_layers == TINY.layers + 3


def test_bad_stage_configs_are_refused(tmp_path: Path, processor: LlavaProcessor) -> None:
    with pytest.raises(ConfigError, match="flag_after"):
        JudgeLayersConfig(name="x", init_from="t", new_layers=3, flag_after=1)
    folder = tmp_path / "no-likelihood"
    _tiny(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    cfg = JudgeLayersConfig(name="x", init_from=str(folder), steps=1, judge_items=2, val_items=2)
    with pytest.raises(ConfigError, match="likelihood tau"):
        train(cfg, tmp_path / "run")
    too_deep = cfg.model_copy(update={"tau": 0.25, "trainable_top": TINY.layers})
    with pytest.raises(ConfigError, match=f"trainable_top {TINY.layers}: .* has {TINY.layers} layers"):
        train(too_deep, tmp_path / "run-deep")


def test_a_swap_replaces_one_word_with_one_of_its_kind() -> None:
    rng = random.Random(0)
    colours_or_shapes = {"red", "blue", "green", "yellow", "circle", "square", "triangle"}
    seen_kinds = 0
    for i in range(40):
        item = GRID.judge_item(GRID.item("val", i), random.Random(i), p_correct=1.0)
        swapped = swap_word(item, rng, ["Row", "empty"])
        before, after = item.candidate.split(" "), swapped.candidate.split(" ")
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changed) == 1 and swapped.corruption == "swap" and not swapped.correct
        old, new = (w.rstrip(".,:").lower() for w in changed[0])
        if old in colours_or_shapes:
            seen_kinds += 1
            assert new in colours_or_shapes and (new in {"circle", "square", "triangle"}) == (
                old in {"circle", "square", "triangle"}
            )
    assert seen_kinds > 0


def test_a_cell_swap_misreads_one_whole_cell_and_keeps_the_rest() -> None:
    rng = random.Random(1)
    directions = set()
    for i in range(60):
        item = GRID.judge_item(GRID.item("val", i), random.Random(i), p_correct=1.0)
        swapped = swap_cell(item, rng)
        if not item.candidate.startswith("Row "):
            assert swapped is None  # the arithmetic and the answer name no cell
            continue
        assert swapped is not None and swapped.corruption == "swap" and swapped.prefix == item.prefix
        head = item.candidate.split(": ", 1)[0]
        assert swapped.candidate.startswith(head + ": ")
        cells = [c.split(". ")[0] for c in item.candidate.removeprefix(head + ": ").split(", ")]
        cells_after = [c.split(". ")[0] for c in swapped.candidate.removeprefix(head + ": ").split(", ")]
        changed = [(a, b) for a, b in zip(cells, cells_after, strict=True) if a != b]
        assert len(changed) == 1 and item.candidate.split(". ", 1)[1] == swapped.candidate.split(". ", 1)[1]
        old, new = changed[0]
        # only the cell's name moves; its marks (" = ...") and the row's totals stay
        assert old.split(" = ")[1:] == new.split(" = ")[1:]
        old_name, new_name = old.split(" = ")[0], new.split(" = ")[0]
        assert "empty" in (old_name, new_name) and old_name != new_name
        directions.add(old_name == "empty")
    assert directions == {True, False}  # both ways: a shape for "empty" and "empty" for a shape


def test_judge_items_swap_whole_cells_only_when_asked() -> None:
    none = judge_items("val", 200, seed=5, swap_fraction=1.0)
    cells = judge_items("val", 200, seed=5, swap_fraction=1.0, cell_swap_fraction=1.0)

    def whole(items: list[JudgeItem]) -> int:  # swaps of one word for two or two for one
        return sum(
            len(i.candidate.split()) != len(i.item.steps[len(i.prefix)].split())
            for i in items
            if i.corruption == "swap"
        )

    assert whole(none) == 0 and whole(cells) > 20
