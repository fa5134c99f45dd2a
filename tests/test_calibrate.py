"""``dreamr calibrate``: TBVM's tau measured for a target on held-out items and written as a
settings folder that ``settings_from`` reads; bad input refused in one line before any model loads.

In this process on the shipped demo target (a few items), and over HTTP against a fake
OpenAI-compatible server (a thread on loopback: the command runs its own event loop), no real vLLM.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dreamr_app import calibrate as app_calibrate
from dreamr_app import cli
from dreamr_stream import Reasoner, UncalibratedVerificationWarning
from dreamr_stream.backends.base import ScoreOutput
from dreamr_stream.backends.settings import read_settings
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import VerificationConfig
from dreamr_stream.errors import ConfigError
from dreamr_stream.zoo.calibrate import CALIBRATION_FILE, choose, write_settings
from dreamr_stream.zoo.calibration_items import Scored
from dreamr_stream.zoo.tbvm_eval import TAU_GRID

ANSWER = "Answer: 4"


class FakeServer(ThreadingHTTPServer):
    """An OpenAI-compatible server in a thread: a one-step answer when streamed, the candidate's
    characters as prompt log-probs when asked for them, a ``yes`` verdict otherwise; it keeps
    every request's body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict[str, Any]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _send(self, payload: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._send(json.dumps({"data": [{"id": "fake"}]}).encode(), "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if body.get("stream"):
            choice = {"index": 0, "delta": {"content": ANSWER}, "finish_reason": "stop", "stop_reason": None}
            self._send(f"data: {json.dumps({'choices': [choice]})}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")
            return
        if body.get("prompt_logprobs"):
            text = body["messages"][-1]["content"]
            positions = [None] + [{"1": {"logprob": -0.05, "rank": 1, "decoded_token": c}} for c in text]
            reply: dict[str, Any] = {"choices": [{"message": {"content": "x"}}], "prompt_logprobs": positions}
        else:
            tops = [{"token": " yes", "logprob": -0.2}, {"token": " no", "logprob": -1.8}]
            reply = {"choices": [{"logprobs": {"content": [{"top_logprobs": tops}]}}]}
        self._send(json.dumps(reply).encode(), "application/json")


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.shutdown()
        fake.server_close()
        thread.join()


def _no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("dreamr_stream.zoo.calibrate.calibrate", refuse)


# ---------------------------------------------------------------------------------- in this process
@pytest.mark.slow
def test_calibrating_the_shipped_target_writes_settings_that_settings_from_applies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = demo_paths()
    out = tmp_path / "settings"
    code = cli.main(
        ["calibrate", "--target", str(paths.target), "--draft", str(paths.draft), "-n", "2", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    settings = read_settings(out)
    v = settings.verification
    assert (
        settings.task == "grid" and settings.judge == read_settings(paths.target).judge
    )  # the template it scored with
    assert v["mode"] in ("judge", "likelihood") and set(v["taus"]) == {"judge", "likelihood"}
    assert v["tau"] == v["taus"][v["mode"]] and all(t in TAU_GRID for t in v["taus"].values())
    record = json.loads((out / CALIBRATION_FILE).read_text())
    assert record["split"] == "val" and record["judge_items"] == 2 and record["draft_items"] > 0
    chosen = record["modes"][v["mode"]]
    assert 0.0 <= chosen["overall"]["recall"] <= 1.0 and 0.0 <= chosen["draft_acceptance"] <= 1.0
    assert "<- chosen" in printed and "right accepted" in printed and "wrong accepted" in printed
    # the folder is what a served copy of this target needs: no warning, the measured verification
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reasoner = Reasoner.from_pretrained(
            target="http://127.0.0.1:9/v1", draft="http://127.0.0.1:9/d", settings_from=out
        )
    reasoner.close()
    assert not [w for w in caught if issubclass(w.category, UncalibratedVerificationWarning)]
    assert reasoner.config.verification == VerificationConfig.recommended(v)
    # again without --force: refused, the settings left as they were
    before = (out / "dreamr.json").read_text()
    assert cli.main(["calibrate", "--target", str(paths.target), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and (out / "dreamr.json").read_text() == before


# ---------------------------------------------------------------------------------- over HTTP
def test_a_served_target_is_calibrated_over_its_api_in_both_modes(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "served"
    judge_from = demo_paths().target
    args = ["calibrate", "--target-url", server.url, "-n", "3", "--out", str(out), "--judge-from", str(judge_from)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert server.url in printed and f'settings_from="{out}"' in printed
    judged = [b for b in server.bodies if b.get("top_logprobs")]
    likelihood = [b for b in server.bodies if b.get("prompt_logprobs")]
    assert len(judged) == 3 and len(likelihood) == 3  # each judge item scored in each mode, one request each
    assert all(b["messages"][-1]["content"].endswith("Check:") for b in judged)  # --judge-from's template
    settings = read_settings(out)
    assert settings.judge == read_settings(judge_from).judge and set(settings.verification["taus"]) == {
        "judge",
        "likelihood",
    }


def test_an_unreachable_server_is_one_line_naming_its_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://127.0.0.1:9/v1"
    assert cli.main(["calibrate", "--target-url", url, "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the target at {url}" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-url", "http://x/v1", "-n", "0"], "-n must be at least 1"),
        (["--target-url", "localhost:8000"], "not a server URL"),
        (["--target", "no/such/folder"], "--target no/such/folder: no such folder"),
        (["--target-url", "http://x/v1", "--draft", "no/such/draft"], "no such folder"),
        (["--target", ".", "--judge-from", "."], "--judge-from applies to --target-url"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_models(monkeypatch)
    assert cli.main(["calibrate", *args, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_task_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["calibrate", "--target-url", "http://x/v1", "--task", "nope", "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2 and "unknown task 'nope'" in capsys.readouterr().err


def test_an_existing_out_needs_force_and_never_replaces_a_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_models(monkeypatch)
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "dreamr.json").write_text("{}")
    assert cli.main(["calibrate", "--target-url", "http://x/v1", "--out", str(settings)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    model = demo_paths().target  # --force must not delete a model's weights
    assert cli.main(["calibrate", "--target-url", "http://x/v1", "--out", str(model), "--force"]) == 2
    assert "not a settings folder" in capsys.readouterr().err and (model / "config.json").exists()


# ---------------------------------------------------------------------------------- the choice
def _scored(kind: str, p_yes: float, token_p: float, source: str = "judge set") -> Scored:
    score = ScoreOutput(p_yes, 1.0 - p_yes, [math.log(token_p)])
    return Scored(kind, source, {"judge": score, "likelihood": score})  # type: ignore[arg-type]


def test_the_mode_that_separates_right_from_wrong_steps_is_chosen_with_its_own_tau() -> None:
    # judge mode cannot tell these apart; the candidates' own likelihood can
    items = [_scored("none", 0.8, 0.9), _scored("none", 0.8, 0.95, "draft"), _scored("total", 0.8, 0.1)]
    items += [_scored("not the target's step", 0.8, 0.2, "draft")]
    mode, results = choose(items, ["judge", "likelihood"])
    assert mode == "likelihood" and results["likelihood"].overall.agreement == 1.0
    assert results["judge"].overall.agreement == 0.5
    assert results["likelihood"].draft_acceptance == 0.5  # one of the draft's two steps
    forced, _ = choose(items, ["judge", "likelihood"], mode="judge")
    assert forced == "judge"


def test_write_settings_refuses_an_existing_folder_without_force(tmp_path: Path) -> None:
    mode, results = choose([_scored("none", 0.9, 0.9), _scored("total", 0.1, 0.1)], ["judge"])
    from dreamr_stream.config import JudgeTemplate
    from dreamr_stream.zoo.calibrate import Calibration

    c = Calibration("http://x/v1", None, "grid", JudgeTemplate(), results, mode, judge_items=2, draft_items=0)
    write_settings(c, tmp_path / "s")
    with pytest.raises(ConfigError, match="exists"):
        write_settings(c, tmp_path / "s")
    write_settings(c, tmp_path / "s", force=True)
    assert read_settings(tmp_path / "s").verification["mode"] == "judge"
    assert "use it" in app_calibrate.report(c, tmp_path / "s", "http://x/v1", None)
