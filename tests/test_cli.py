"""``dreamr reason``: bad input reported in one line before any model loads; demo-task warnings; the comparison line.

The daemon path has tests of its own (tests/test_reason_daemon.py); the end-to-end runs here use --no-daemon.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_support import run_dreamr
from PIL import Image

from dreamr_app import cli, reason
from dreamr_app.reason import Comparison
from dreamr_stream.tasks import get_task
from dreamr_stream.tasks.grid.puzzles import make_puzzle, split_seed

QUESTION = "How many red shapes are there?"


@pytest.fixture(autouse=True)
def own_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's files, if a command gets that far, in a folder of the test's own, never the user's."""
    monkeypatch.setenv("DREAMR_RUNTIME_DIR", str(tmp_path / "runtime"))


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: every error below must come first."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(reason, "load_reasoner", refuse)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["reason", *args])
    return code, capsys.readouterr().err


def png(path: Path, size: tuple[int, int] = (112, 112)) -> Path:
    Image.new("RGB", size, (250, 250, 250)).save(path)
    return path


@pytest.mark.parametrize(
    ("make", "question", "message"),
    [
        (lambda d: d / "missing.png", QUESTION, "missing.png: no such file"),
        (lambda d: d, QUESTION, ": not a file"),
        (lambda d: (d / "text.png").write_text("hello") and d / "text.png", QUESTION, "text.png: not a readable image"),
        (lambda d: png(d / "ok.png"), None, "a question is required"),
        (lambda d: png(d / "ok.png"), "   ", "the question is empty"),
        (lambda d: png(d / "tiny.png", (2, 2)), QUESTION, "each side must be at least"),
    ],
)
def test_bad_input_is_one_line_before_any_model(
    make: Any, question: str | None, message: str, tmp_path: Path, no_models: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(make(tmp_path))] + ([question] if question is not None else [])
    code, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dreamr reason: error: ") and message in err
    assert "BytesIO" not in err and "Traceback" not in err


def test_an_unknown_task_is_a_usage_error_naming_the_known_ones(
    no_models: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_cli(["--random", "--task", "nope", "--no-daemon"], capsys)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'; known tasks: " in err and "grid" in err


def test_cuda_without_cuda_is_one_line(
    tmp_path: Path, no_models: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli([str(png(tmp_path / "ok.png")), QUESTION, "--device", "cuda"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--device cuda: this torch" in err and "sees no CUDA GPU" in err and "--device cpu" in err


def test_unknown_device_is_one_line(tmp_path: Path, no_models: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([str(png(tmp_path / "ok.png")), QUESTION, "--device", "tpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device tpu: not a device torch knows" in err


def test_input_errors_come_fast_in_a_fresh_process(tmp_path: Path) -> None:
    """A mistyped path is reported without importing torch or transformers, let alone loading a model."""
    code = (
        "import sys; from dreamr_app.cli import main; rc = main(sys.argv[1:]); "
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'; sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "reason", str(tmp_path / "typo.png"), QUESTION],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"dreamr reason: error: {tmp_path / 'typo.png'}: no such file"


def test_demo_puzzles_raise_no_warning() -> None:
    for i in range(200):
        puzzle = make_puzzle(split_seed("test", i), hard=i % 2 == 1)
        assert get_task().off_task_warnings(puzzle.image, puzzle.question.text()) == [], puzzle.question.text()


def test_photos_and_other_questions_are_warned_about() -> None:
    puzzle = make_puzzle(split_seed("test", 1))
    photo = Image.new("RGB", (640, 480), (30, 90, 40))
    grey_grid = Image.new("RGB", (112, 112), (90, 90, 90))
    assert len(get_task().off_task_warnings(photo, "What animal is this?")) == 2
    assert "not a demo grid puzzle" in get_task().off_task_warnings(photo, puzzle.question.text())[0]
    assert "not a demo grid puzzle" in get_task().off_task_warnings(grey_grid, puzzle.question.text())[0]
    assert "not one the demo task asks" in get_task().off_task_warnings(puzzle.image, "Is this a cat?")[0]
    # the same question typed differently is still the demo's question
    assert get_task().off_task_warnings(puzzle.image, "  " + puzzle.question.text().lower().rstrip("?") + " ") == []


def test_comparison_line_says_measured_or_estimate() -> None:
    measured = Comparison(wall_s=0.5, target_alone_s=1.25, how="measured")
    assert measured.line("FPSR") == "FPSR 0.50 s, the target alone 1.25 s: 2.50x faster (measured)"
    slower = Comparison(wall_s=2.0, target_alone_s=1.0, how="estimate: ...")
    assert slower.line("FPSR") == "FPSR 2.00 s, the target alone ≈1.00 s: ≈2.00x slower (estimate: ...)"


@pytest.mark.slow
def test_compare_measures_the_target_alone(tmp_path: Path) -> None:
    # the models in the command (tests/test_reason_daemon.py measures through the daemon)
    args = ["reason", "--random", "--seed", "2", "--compare", "--no-daemon", "--save-image", str(tmp_path / "p.png")]
    out = run_dreamr(*args, timeout=180)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("FPSR ") and last.endswith("(measured)") and "≈" not in last


def test_the_console_script_runs_the_exit_handlers_then_exits_without_the_teardown() -> None:
    code = """
import atexit
from dreamr_app import cli

class Collected:
    def __del__(self):
        print("torn down", flush=True)  # in the interpreter's teardown, which is skipped

kept = Collected()
atexit.register(lambda: print("handler ran", flush=True))
cli.main = lambda argv=None: 3
cli.entry()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and out.stdout == "handler ran\n", out.stderr


def test_the_console_script_waits_for_threads_that_are_still_working() -> None:
    code = (
        "import threading, time, sys; from dreamr_app import cli; "
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done', flush=True))).start(); "
        "cli.main = lambda argv=None: 0; cli.entry()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "thread done\n", out.stderr


def test_model_text_is_printed_as_text_never_as_markup() -> None:
    """A model (or a cache, or a question) writing rich markup gets it shown literally: no style
    switched by it, and no crash on a closing tag that closes nothing."""
    import argparse
    import io

    from rich.console import Console

    from dreamr_stream import events as ev
    from dreamr_stream.types import ReasoningResult, ReasoningStats, Step, StepSource, Verdict

    hostile = "[/red][bold link=https://evil.example]3[/bold] [/]"
    verdict = Verdict(p_pos=0.1, p_neg=0.9, ratio=0.11, tau=1.0, accepted=False)
    step = Step(index=0, text=f"Answer: {hostile}", source=StepSource.TARGET, is_final=True)
    shown = [
        ev.DraftedEvent(index=0, text=hostile),
        ev.RejectedEvent(index=0, text=hostile, verdict=verdict),
        ev.FallbackEvent(step=step),
        ev.FailedEvent(error="BackendError", message=hostile),
    ]
    out = io.StringIO()
    console = Console(file=out, width=400, color_system=None, highlight=False)
    for event in shown:
        reason.show(event, argparse.Namespace(events=True), console)
    result = ReasoningResult(question="q", steps=[step], answer=hostile, stats=ReasoningStats())
    reason.summary(result, None, console)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and all(hostile in line for line in lines[:5]), lines


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        # a served target with a draft of one's own: that draft, and no settings guessed for the target
        ({"target_url": "http://h:8000/v1", "draft": "my-draft"}, ("http://h:8000/v1", "my-draft", None)),
        # --target beside --target-url is the target's settings folder
        (
            {"target_url": "http://h:8000/v1", "target": "settings", "draft": "my-draft"},
            ("http://h:8000/v1", "my-draft", "settings"),
        ),
    ],
)
def test_the_model_flags_load_the_user_s_draft_and_never_guess_a_served_target_s_settings(
    flags: dict[str, str], expected: tuple[str, str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from dreamr_app.common import load_reasoner
    from dreamr_stream.reasoner import Reasoner

    seen: list[tuple[Any, Any, Any]] = []

    def from_pretrained(**kw: Any) -> str:
        seen.append((kw["target"], kw["draft"], kw["settings_from"]))
        return "reasoner"

    def demo(**kw: Any) -> str:
        raise AssertionError("the demo's models replaced the user's")

    monkeypatch.setattr(Reasoner, "from_pretrained", from_pretrained)
    monkeypatch.setattr(Reasoner, "demo", demo)
    base = {"target": None, "draft": None, "demo_draft": None, "target_url": None, "draft_url": None, "device": "cpu"}
    assert load_reasoner(argparse.Namespace(**(base | flags))) == "reasoner"  # type: ignore[comparison-overlap]
    assert seen == [expected]
