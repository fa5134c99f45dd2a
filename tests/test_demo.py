"""End-to-end on the shipped demo models (slow: real CPU decoding)."""

from __future__ import annotations

import math
import re

import pytest
from cli_support import run_dreamr

from dreamr_stream import Reasoner, ReasonerConfig, StepSource, VerificationConfig
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.tasks.grid.puzzles import make_puzzle, parse_answer, split_seed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo() -> Reasoner:
    return Reasoner.demo()


def test_shipped_weights_are_small_bf16_safetensors() -> None:
    paths = demo_paths()
    files = [f for d in (paths.target.parent,) for f in d.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in weights) <= 64 * 2**20
    import json

    for folder in (paths.target, paths.draft):
        assert json.loads((folder / "config.json").read_text())["dtype"] in ("bfloat16", "float16")


@pytest.mark.asyncio
async def test_fpsr_matches_target_answers(demo: Reasoner) -> None:
    agree = 0
    for i in range(4):
        p = make_puzzle(split_seed("test", i))
        fpsr = await demo.ainvoke(p.image, p.question.text())
        target = await demo.ainvoke(p.image, p.question.text(), method="target_only")
        agree += fpsr.answer == target.answer
        assert fpsr.steps[-1].is_final and fpsr.answer is not None
        assert parse_answer(fpsr.steps[-1].text) is not None
    assert agree >= 3


@pytest.mark.asyncio
async def test_extreme_taus_on_demo_models(demo: Reasoner) -> None:
    p = make_puzzle(split_seed("test", 3))
    inf = ReasonerConfig(verification=VerificationConfig(tau=math.inf))
    zero = ReasonerConfig(verification=VerificationConfig(tau=0.0))
    target = [s.text for s in (await demo.ainvoke(p.image, p.question.text(), method="target_only")).steps]
    draft = [s.text for s in (await demo.ainvoke(p.image, p.question.text(), method="draft_only")).steps]
    got_inf = await demo.ainvoke(p.image, p.question.text(), config=inf)
    got_zero = await demo.ainvoke(p.image, p.question.text(), config=zero)
    assert [s.text for s in got_inf.steps] == target
    assert all(s.source is StepSource.TARGET for s in got_inf.steps)
    assert [s.text for s in got_zero.steps] == draft
    # every rejected draft was repaired from the start the target agreed with, to the target's own step
    assert got_inf.stats.steps_repaired >= len(target) // 2
    for step in got_inf.steps:
        if step.kept is not None:
            assert step.kept and step.text.startswith(step.kept) and (step.rejected_draft or "").startswith(step.kept)


@pytest.mark.asyncio
async def test_repaired_steps_are_the_targets_own_at_a_fraction_of_its_forwards(demo: Reasoner) -> None:
    """tau=inf rejects every draft: FPSR and the sequential schedule, both repairing, give the
    target's own steps token for token; the repairs cost far fewer forwards than writing them."""
    inf = ReasonerConfig(verification=VerificationConfig(tau=math.inf))
    forwards = tokens = 0
    for i in (0, 5):
        p = make_puzzle(split_seed("test", i))
        q = p.question.text()
        target = [s.text for s in (await demo.ainvoke(p.image, q, method="target_only")).steps]
        for method in ("fpsr", "sequential"):
            got = await demo.ainvoke(p.image, q, method=method, config=inf)  # type: ignore[arg-type]
            assert [s.text for s in got.steps] == target, method
            for step in got.steps:
                assert step.source is StepSource.TARGET and step.cost is not None
                if step.rejected_draft:
                    forwards += step.cost.target_forwards
                    tokens += step.cost.tokens
    assert tokens and forwards / tokens < 0.5, (forwards, tokens)


def test_cli_reason_random_runs_offline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the models in the command: no daemon left behind (tests/test_reason_daemon.py runs through one)
    args = ["reason", "--random", "--seed", "1", "--events", "--no-daemon", "--save-image", str(tmp_path / "p.png")]
    out = run_dreamr(*args, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Answer:" in out.stdout and "first step" in out.stdout
    last = out.stdout.strip().splitlines()[-1]  # the comparison with the target alone, said to be an estimate
    assert re.fullmatch(
        r"FPSR \d+\.\d\d s, the target alone ≈\d+\.\d\d s: ≈\d+\.\d\dx (faster|slower) \(estimate: .*\)", last
    )
    assert "warning" not in out.stdout  # a demo puzzle is what the demo models know
    assert (tmp_path / "p.png").exists()


def test_prefix_evaluation_judges_every_step_of_the_targets_trajectories(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`dreamr zoo eval --prefixes`: the shipped SAPO draft's greedy step at every prefix of
    the target's own trajectories, with both step lengths at those prefixes."""
    import json

    from dreamr_stream.backends.hf import TransformersBackend
    from dreamr_stream.sapo.prompts import TrajectoryCache
    from dreamr_stream.zoo.evaluate import main
    from dreamr_stream.zoo.prompts import task_prompts

    paths = demo_paths()
    out = tmp_path / "eval.json"
    args = ["--target", str(paths.target), "--draft", str(paths.draft), "--methods", "", "--prefixes", "3"]
    main([*args, "--json", str(out)])
    report = json.loads(out.read_text())["prefixes"]
    target = TransformersBackend.from_pretrained(paths.target, device="cpu", name="target")
    prompts = task_prompts(target, TrajectoryCache(), "test", 3)
    assert report["puzzles"] == 3 and report["judged"] == sum(len(p.steps) for p in prompts)
    assert 0.0 <= report["acceptance"] <= 1.0 and report["acceptance"] > 0.5  # the shipped draft mostly agrees
    assert report["step_tokens"] > 5 and report["target_step_tokens"] > 5
    # the draft's mean step is the target's, plus what it adds, less what it leaves out
    assert report["excess_tokens"] >= 0 and report["shortfall_tokens"] >= 0
    assert report["step_tokens"] == pytest.approx(
        report["target_step_tokens"] + report["excess_tokens"] - report["shortfall_tokens"]
    )
    assert report["accepted_step_tokens"] > 5 and report["accepted_target_step_tokens"] > 5
