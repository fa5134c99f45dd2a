"""The charts task end to end on its shipped models (slow: real CPU decoding), chosen the ways a
user chooses a task: ``Reasoner.demo(task=...)``, ``dreamr reason --task``, ``dreamr bench --task``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import run_dreamr

from dreamr_stream import Reasoner
from dreamr_stream.backends.shipped import default_draft, demo_paths, shipped_drafts, shipped_tasks
from dreamr_stream.tasks import get_task

pytestmark = pytest.mark.slow

TASK = get_task("charts")


@pytest.fixture(scope="module")
def charts() -> Reasoner:
    return Reasoner.demo(task="charts")


def test_both_tasks_ship_their_models_side_by_side() -> None:
    assert shipped_tasks() == ["grid", "charts"]  # the default first
    # no SAPO draft ships for charts yet (no SAPO run beat the SFT draft by more than noise): the demo's is SFT
    assert shipped_drafts("charts") == ["sft"] and default_draft("charts") == "sft"
    for draft in ("sft",):
        paths = demo_paths(draft, "charts")
        assert paths.target.name == "charts-target" and paths.draft.name == f"charts-draft-{draft}"
        for folder in (paths.target, paths.draft):
            assert json.loads((folder / "dreamr.json").read_text())["task"] == "charts"
    # the grid's folders are still the grid's
    assert demo_paths("sapo").target.name == "target"


@pytest.mark.asyncio
async def test_fpsr_answers_charts_as_the_target_does(charts: Reasoner) -> None:
    assert charts.task == "charts"
    agree = 0
    for i in range(4):
        item = TASK.item("test", i)
        fpsr = await charts.ainvoke(item.image, item.question)
        target = await charts.ainvoke(item.image, item.question, method="target_only")
        agree += fpsr.answer == target.answer
        assert fpsr.steps[-1].is_final and TASK.parse_answer(fpsr.steps[-1].text) is not None
        assert fpsr.stats.draft_steps_judged > 0  # it speculated: the draft's steps were verified
    assert agree >= 3  # FPSR keeps the target's answers (its accuracy is the eval's: benchmarks/results)


def test_cli_reason_task_charts_random(tmp_path: Path) -> None:
    image = tmp_path / "chart.png"
    args = ["reason", "--task", "charts", "--random", "--seed", "3", "--no-daemon", "--save-image", str(image)]
    out = run_dreamr(*args, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "Answer:" in out.stdout and "warning" not in out.stdout  # a chart is what these models know
    from PIL import Image

    assert Image.open(image).size == (TASK.image_size, TASK.image_size)


def test_cli_bench_task_charts_writes_its_own_files(tmp_path: Path) -> None:
    args = ["bench", "--task", "charts", "-n", "1", "--methods", "target_only,fpsr_sft", "--out", str(tmp_path)]
    out = run_dreamr(*args, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "bench_cpu_charts.json").read_text())
    assert result["config"]["task"] == "charts" and list(result["methods"]) == ["target_only", "fpsr_sft"]
    assert "faithfulness" in result["methods"]["fpsr_sft"]
