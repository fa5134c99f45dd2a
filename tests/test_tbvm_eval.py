"""The judge stage's data (the drafts' own steps) and TBVM's evaluation against ground truth."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from dreamr_stream.backends.base import ScoreOutput
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.tasks.grid.puzzles import make_puzzle, split_seed
from dreamr_stream.zoo.build import DRAFT_SHAPE
from dreamr_stream.zoo.data import judge_item_example
from dreamr_stream.zoo.draft_steps import DraftStep, read_pool, sample_draft_steps, write_pool
from dreamr_stream.zoo.tbvm_eval import (
    Labelled,
    auroc,
    choose_tau,
    draft_steps_scored,
    judge_set_scored,
    tbvm_report,
)
from dreamr_stream.zoo.train import TrainConfig, train


def _item(kind: str, p_yes: float, token_p: float) -> Labelled:
    return Labelled(kind, ScoreOutput(p_yes, 1.0 - p_yes, [0.0, math.log(token_p)]))


def test_a_report_counts_recall_false_accepts_precision_and_agreement_per_mode() -> None:
    items = [
        _item("none", 0.9, 0.9),
        _item("none", 0.8, 0.1),  # judge mode accepts it, likelihood mode does not
        _item("total", 0.7, 0.05),  # judge mode wrongly accepts it
        _item("misread", 0.1, 0.01),
    ]
    judge = tbvm_report(items, "judge", 1.0)
    assert (judge.n, judge.right) == (4, 2)
    assert judge.recall == 1.0 and judge.false_accept == 0.5
    assert judge.precision == pytest.approx(2 / 3) and judge.agreement == 0.75
    assert judge.accept_by_kind == {"misread": 0.0, "none": 1.0, "total": 1.0}
    likelihood = tbvm_report(items, "likelihood", 0.25)  # accepts a min token p of 0.2 and up
    assert likelihood.recall == 0.5 and likelihood.false_accept == 0.0 and likelihood.precision == 1.0


def test_choose_tau_separates_the_labels_and_prefers_the_lowest_such_tau() -> None:
    rng = random.Random(0)
    items = [_item("none", rng.uniform(0.7, 0.99), 0.9) for _ in range(20)]
    items += [_item("count", rng.uniform(0.01, 0.4), 0.9) for _ in range(20)]
    tau = choose_tau(items, "judge")
    report = tbvm_report(items, "judge", tau)
    assert report.agreement == 1.0
    # the lowest tau of the grid that still rejects every wrong step (p_yes <= 0.4: ratio <= 2/3)
    assert 0.4 / 0.6 < tau < 0.7 / 0.3
    assert tbvm_report(items, "judge", tau / 10 ** (1 / 8)).agreement < 1.0


def test_the_drafts_steps_are_labelled_by_the_reference_and_round_trip(tmp_path: Path) -> None:
    draft = TransformersBackend.from_pretrained(demo_paths().draft, device="cpu", name="draft-sapo")
    steps = sample_draft_steps(draft, "train", range(900_000, 900_004), temperatures=(0.0, 1.0), seed=3)
    assert len(steps) == 8
    for s in steps:
        reference = list(s.item().steps)
        assert s.correct == (s.text == reference[s.k]) and s.draft == "draft-sapo"
        item = s.judge_item()
        assert item.prefix == reference[: s.k] and item.candidate == s.text and item.correct == s.correct
    write_pool(steps, tmp_path / "pool.jsonl")
    assert read_pool(tmp_path / "pool.jsonl") == steps
    # a wrong step becomes a " no" judge example whose candidate is not trained
    wrong = DraftStep("train", 7, False, 1, "Row 2: nonsense.", False, "d", 1.0)
    example, correct = judge_item_example(draft.processor, wrong.judge_item())
    no = draft.tokenizer(" no", add_special_tokens=False)["input_ids"]
    assert not correct and example.labels[-1] == no[0] and example.input_ids[-1] == no[0]
    assert example.labels[-3] == -100  # "Check:" is read, not trained


def test_a_judge_item_flags_every_candidate_token_until_the_first_wrong_one() -> None:
    from dreamr_stream.tasks import JudgeItem, get_task
    from dreamr_stream.zoo.data import IGNORE

    processor = TransformersBackend.from_pretrained(demo_paths().draft, device="cpu").processor
    item = get_task().item("test", 3)
    steps = list(item.steps)
    right = JudgeItem(item, steps[:1], steps[1], "none")
    wrong = JudgeItem(item, steps[:1], steps[1].replace("Row 2:", "Row 3:"), "count")
    (good, _), (bad, _) = judge_item_example(processor, right), judge_item_example(processor, wrong)
    good_flags = [f for f in good.flags or [] if f != IGNORE]
    bad_flags = [f for f in bad.flags or [] if f != IGNORE]
    assert good_flags and set(good_flags) == {1}  # on track to the end, and the suffix says so
    # "Row" agrees, then the row number is wrong: 0 from there on, suffix included
    assert bad_flags[0] == 1 and bad_flags[1:] == [0] * (len(bad_flags) - 1)
    assert (good.flags or [])[-1] == IGNORE  # the verdict token itself is the verdict loss's


def test_both_sets_are_scored_once_for_both_modes_on_the_shipped_models() -> None:
    paths = demo_paths()
    target = TransformersBackend.from_pretrained(paths.target, device="cpu", name="target")
    draft = TransformersBackend.from_pretrained(paths.draft, device="cpu", name="draft")
    judged = judge_set_scored(target, "test", n=6)
    assert len(judged) == 6
    for x in judged:  # the judge verdict's probabilities and the candidate's log-probs, from one forward
        assert 0.0 <= x.score.p_pos <= 1.0 and 0.0 <= x.score.p_neg <= 1.0 and x.score.token_logprobs
    puzzle = make_puzzle(split_seed("test", 0))
    prompt = RolloutPrompt(puzzle.image, puzzle.question.text(), puzzle.steps())
    real = draft_steps_scored(target, draft, [prompt])
    assert len(real) == len(puzzle.steps())
    assert {x.kind for x in real} <= {"none", "not the target's step"}
    likelihood = tbvm_report(real, "likelihood", 0.25)
    assert likelihood.right == sum(x.right for x in real) and likelihood.n == len(real)


@pytest.mark.slow
def test_a_judge_stage_trains_on_the_pool_and_reports_its_held_out_accuracy(tmp_path: Path) -> None:
    """Ten steps of a judge stage from a tiny model: the pool's held-out puzzles are measured."""
    paths = demo_paths()
    draft = TransformersBackend.from_pretrained(paths.draft, device="cpu", name="draft")
    steps = sample_draft_steps(draft, "train", range(0, 30), temperatures=(1.0,), seed=0)  # 0 and 25: held out
    write_pool(steps, tmp_path / "pool.jsonl")
    cfg = TrainConfig(
        name="judge-test",
        shape=DRAFT_SHAPE,
        steps=10,
        batch_size=4,
        eval_every=10,
        eval_size=4,
        judge_fraction=1.0,
        judge_weight=5.0,
        flag_weight=1.0,
        flag_layer=1,
        early_exit_weight=0.5,
        early_exit_layer=0,
        draft_steps=str(tmp_path / "pool.jsonl"),
        draft_step_fraction=0.5,
        threads=1,
    )
    torch.manual_seed(0)
    final = train(cfg, tmp_path / "run", paths.target)
    assert (final / "model.safetensors").exists()
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    last = [e for e in evals if "val_draft_judge_acc" in e][-1]
    assert 0.0 <= last["val_judge_acc"] <= 1.0 and 0.0 <= last["val_draft_judge_acc"] <= 1.0
    trained = [r for r in evals if "flag" in r]
    assert trained and all(r["flag"] > 0 and r["early"] > 0 for r in trained)  # flag and early exit supervised


def test_zoo_eval_reports_both_modes_side_by_side(tmp_path: Path) -> None:
    from dreamr_stream.zoo.evaluate import main

    paths = demo_paths()
    recommended = json.loads((paths.target / "dreamr.json").read_text())["verification"]["mode"]
    other = "judge" if recommended == "likelihood" else "likelihood"
    out = tmp_path / "eval.json"
    args = ["--target", str(paths.target), "--draft", str(paths.draft), "--methods", "fpsr,target_only", "-n", "1"]
    main([*args, "--judge-n", "4", "--prefixes", "1", "--modes", "judge,likelihood", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["fpsr"]["mode"] == recommended and report[f"fpsr_{other}"]["mode"] == other
    assert f"target_only_{other}" not in report  # the target alone does not verify: one run
    for name, n in (("judge_set", 4), ("draft_steps", len(make_puzzle(split_seed("test", 0)).steps()))):
        assert set(report["tbvm"][name]) == {"judge", "likelihood"}
        assert all(r["n"] == n for r in report["tbvm"][name].values())


def test_auroc_is_the_chance_a_positive_scores_above_a_negative() -> None:
    positive = torch.tensor([True, True, False, False])
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), positive) == 1.0
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), positive) == 0.0
    assert auroc(torch.tensor([0.9, 0.5, 0.5, 0.1]), positive) == 0.875  # one tie of four pairs: half
    assert math.isnan(auroc(torch.tensor([0.3, 0.4]), torch.tensor([True, True])))
