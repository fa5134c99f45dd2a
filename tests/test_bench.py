"""`dreamr bench` end to end on the shipped demo models (one prompt: it checks wiring, not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.bench import ALL_METHODS, faithful, faithfulness, ideal_speedup, run_bench, save, to_markdown
from dreamr_stream.tasks import get_task


def test_ideal_speedup_formula() -> None:
    # no acceptance and free drafting: FPSR can't beat the target; full acceptance: bound by drafting/scoring
    assert ideal_speedup(c=0.0, v=0.0, step_tokens=20, acceptance=0.0) == pytest.approx(1.0)
    assert ideal_speedup(c=0.1, v=1.5, step_tokens=20, acceptance=1.0) == pytest.approx(20 / 2.0)
    assert ideal_speedup(c=0.1, v=1.5, step_tokens=20, acceptance=0.5) == pytest.approx(20 / (2.0 + 10))
    # no overlap: drafting and scoring add up
    assert ideal_speedup(c=0.1, v=1.5, step_tokens=20, acceptance=1.0, overlap=False) == pytest.approx(20 / 3.5)


@pytest.mark.parametrize("task", ["grid", "charts"])
def test_a_faithful_answer_writes_every_reference_step(task: str) -> None:
    item = get_task(task).item("test", 3)
    steps = list(item.steps)
    assert faithful(steps, item)
    assert faithful(["", *[f" {s} " for s in steps]], item)  # blank lines and outer spaces aside
    assert not faithful(steps[:-1], item)  # a step missing
    assert not faithful([*steps, steps[-1]], item)  # one too many
    wrong = steps[0].replace("1", "7") if "1" in steps[0] else steps[0] + " x"
    assert not faithful([wrong, *steps[1:]], item)  # the same answer through a wrong step


def test_faithfulness_counts_right_answers_only() -> None:
    assert faithfulness([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)
    assert faithfulness([False, False], [True, True]) is None


def test_unknown_bench_method_is_a_clear_error() -> None:
    paths = demo_paths("sft")
    with pytest.raises(ValueError, match="unknown bench methods"):
        run_bench(target_dir=paths.target, sft_dir=paths.draft, sapo_dir=None, n=1, methods=("fpsr_turbo",))


@pytest.mark.slow
def test_bench_runs_every_method_and_writes_its_outputs(tmp_path: Path) -> None:
    paths = demo_paths("sft")
    methods = ALL_METHODS
    calls: list[int] = []
    result = run_bench(
        target_dir=paths.target,
        sft_dir=paths.draft,
        sapo_dir=paths.draft,  # any draft folder: the wiring is what is under test
        n=1,
        methods=methods,
        progress=lambda i, n: calls.append(i),
    )
    assert calls == [1]
    # the target's recommended TBVM mode is what the speculative methods ran with; the row named
    # for that mode is fpsr_sapo itself, so only the other mode's row runs
    recommended = json.loads((paths.target / "dreamr.json").read_text())["verification"]
    other = "judge" if recommended["mode"] == "likelihood" else "likelihood"
    methods = tuple(m for m in methods if m != f"fpsr_sapo_{recommended['mode']}")
    assert list(result.methods) == list(methods)
    assert result.config["verification"]["mode"] == recommended["mode"]
    assert result.methods["fpsr_sapo"]["tbvm"].startswith(recommended["mode"])
    assert result.methods[f"fpsr_sapo_{other}"]["tbvm"].startswith(other)
    assert result.methods["target_only"]["tbvm"] is None
    assert result.methods["target_only"]["speedup_median"] == pytest.approx(1.0)
    for m in ("sequential_sft", "sequential_sapo", "fpsr_sft", "fpsr_sapo", "fpsr_sapo_threads", f"fpsr_sapo_{other}"):
        rec = result.methods[m]
        assert 0.0 <= rec["acceptance"] <= 1.0 and rec["ideal_speedup"] > 0 and rec["efficiency"] > 0
    for rec in result.methods.values():
        assert rec["wall_median_s"] > 0 and rec["tokens_per_s"] > 0
        assert rec["faithfulness"] is None or 0.0 <= rec["faithfulness"] <= 1.0
    save(result, tmp_path, "t")
    table = to_markdown(result)
    assert all(f"| {m} |" in table for m in methods)
    assert json.loads((tmp_path / "bench_t.json").read_text())["methods"].keys() == set(methods)
    assert (tmp_path / "bench_t.md").read_text() == table
    assert (tmp_path / "bench_t.png").stat().st_size > 0
