"""The speculation schedule (``engine.schedule``): the lookahead by requests in flight and the
draft's rolling acceptance, chosen as a request starts and again at each of its epochs, its
choice in the request's stats; a row's TBVM mode taken where the target's folder measured it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from dreamr_stream.backends.base import Capabilities
from dreamr_stream.backends.fake import AsyncScriptedBackend, ScriptedBackend
from dreamr_stream.backends.loading import LoadedModels
from dreamr_stream.backends.settings import read_settings
from dreamr_stream.backends.vllm import VLLMBackend
from dreamr_stream.config import ReasonerConfig, ScheduleRow, SchedulingConfig, VerificationConfig
from dreamr_stream.engine.schedule import PROBE_EVERY, UNLIMITED, AcceptanceWindow, plan, rows
from dreamr_stream.errors import ConfigError
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.types import ReasoningResult
from dreamr_stream.zoo.calibrate_schedule import Candidate, choose_rows, measure_schedule, write_schedule

IMAGE = Image.new("RGB", (16, 16), (1, 2, 3))
SOLUTION = ["Row 0: red", "Row 1: blue", "Row 2: green", "Row 3: red", "two colours", "Answer: 2"]
TABLE = (ScheduleRow(in_flight=1, lookahead=3), ScheduleRow(in_flight=2, lookahead=1))


# ---------------------------------------------------------------------- the pure choice
def test_the_first_row_at_or_above_the_load_chooses_and_above_the_table_the_target_is_alone() -> None:
    assert plan(TABLE, in_flight=1).lookahead == 3
    two = plan(TABLE, in_flight=2)
    assert (two.lookahead, two.reason) == (1, "schedule: up to 2 in flight")
    three = plan(TABLE, in_flight=3)
    assert three.lookahead == 0 and three.reason == "load: 3 requests in flight (speculating up to 2)"
    table = (ScheduleRow(in_flight=1, lookahead=2), ScheduleRow(in_flight=4, lookahead=0))
    assert plan(table, in_flight=3).reason == "load: 3 requests in flight (the target alone up to 4)"
    assert plan(TABLE, in_flight=1, max_lookahead=2).lookahead == 2  # never beyond the request's steps


def test_a_low_acceptance_sends_requests_alone_but_a_probe_still_speculates() -> None:
    low = plan(TABLE, in_flight=1, acceptance=0.2, min_acceptance=0.5)
    assert low.lookahead == 0 and low.reason.startswith("acceptance: 0.20")
    probe = plan(TABLE, in_flight=1, acceptance=0.2, min_acceptance=0.5, probe=True)
    assert probe.lookahead == 3 and probe.reason.startswith("probe")
    assert plan(TABLE, in_flight=1, acceptance=None, min_acceptance=0.5).lookahead == 3  # nothing measured yet


def test_without_a_table_the_switch_is_a_table_of_one_row() -> None:
    assert rows(SchedulingConfig(lookahead=2), 2) == (ScheduleRow(in_flight=2, lookahead=2),)
    assert plan(rows(SchedulingConfig(lookahead=2), None), in_flight=500).lookahead == 2  # no limit
    assert rows(SchedulingConfig(schedule=TABLE), 2) == TABLE


def test_a_schedule_is_checked_when_configured() -> None:
    with pytest.raises(ConfigError, match="increasing in_flight"):
        SchedulingConfig(schedule=(ScheduleRow(in_flight=4, lookahead=1), ScheduleRow(in_flight=2, lookahead=2)))
    with pytest.raises(ConfigError, match="at least one row"):
        SchedulingConfig(schedule=())
    with pytest.raises(ConfigError):
        ScheduleRow(in_flight=0, lookahead=1)
    cfg = SchedulingConfig.model_validate({"schedule": [{"in_flight": 4, "lookahead": 2, "mode": "judge"}]})
    assert cfg.schedule == (ScheduleRow(in_flight=4, lookahead=2, mode="judge"),)  # from dreamr.json's JSON


def test_the_acceptance_window_rolls() -> None:
    w = AcceptanceWindow(size=4)
    assert w.value is None
    w.add(judged=2, accepted=2)
    w.add(judged=4, accepted=1)
    assert w.value == 0.25  # only the last 4 verdicts


# ---------------------------------------------------------------------- in the engine
class Measured(AsyncScriptedBackend):
    """A served target whose folder measured a tau for both TBVM modes."""

    @property
    def capabilities(self) -> Capabilities:
        taus = {"judge": 0.5, "likelihood": 0.25}
        return replace(super().capabilities, recommended_verification={"mode": "judge", "tau": 0.5, "taus": taus})


def _reasoner(target: Any, draft: Any, **scheduling: Any) -> Reasoner:
    verification = VerificationConfig(mode="judge", tau=1.0)
    return Reasoner(
        target, draft, config=ReasonerConfig(verification=verification, scheduling=SchedulingConfig(**scheduling))
    )


async def _at_once(reasoner: Reasoner, n: int, gap_s: float = 0.02) -> list[ReasoningResult]:
    results: list[ReasoningResult] = []

    async def one() -> None:
        results.append(await reasoner.ainvoke(IMAGE, "q?"))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
            await anyio.sleep(gap_s)
    return sorted(results, key=lambda r: r.stats.schedule.in_flight if r.stats.schedule else 0)


@pytest.mark.asyncio
async def test_each_request_gets_the_rows_lookahead_and_says_so() -> None:
    reasoner = _reasoner(AsyncScriptedBackend(SOLUTION, token_delay_s=0.01), ScriptedBackend(SOLUTION), schedule=TABLE)
    alone = await reasoner.ainvoke(IMAGE, "q?")
    assert alone.stats.schedule is not None and alone.stats.schedule.lookahead == 3
    assert [s.text for s in alone.steps] == SOLUTION and alone.stats.target_alone_from is None
    results = await _at_once(reasoner, 3)
    assert [r.stats.schedule.lookahead for r in results if r.stats.schedule] == [3, 1, 0]
    third = results[-1].stats
    assert third.target_alone_from == 0 and (third.target_alone_reason or "").startswith("load: 3 requests")
    assert all([s.text for s in r.steps] == SOLUTION for r in results)


@pytest.mark.asyncio
async def test_a_speculating_request_goes_alone_when_the_load_rises_mid_request() -> None:
    """The schedule is asked again as each epoch ends: a request that started alone on the
    server goes on alone once others join."""
    # every draft rejected, so that epochs end after each step
    slow = AsyncScriptedBackend(SOLUTION, token_delay_s=0.02, judge_fn=lambda q, p, c: (0.05, 0.9))
    reasoner = _reasoner(slow, ScriptedBackend(SOLUTION), schedule=(ScheduleRow(in_flight=1, lookahead=2),))
    results = await _at_once(reasoner, 3, gap_s=0.15)
    first = results[0].stats
    assert first.schedule is not None and first.schedule.lookahead == 2  # it started speculating
    assert first.target_alone_from is not None and first.target_alone_from > 0
    assert (first.target_alone_reason or "").startswith("load")
    assert all([s.text for s in r.steps] == SOLUTION for r in results)


@pytest.mark.asyncio
async def test_a_low_acceptance_stops_speculation_but_every_eighth_request_probes() -> None:
    target = AsyncScriptedBackend(SOLUTION, judge_fn=lambda q, p, c: (0.05, 0.9))  # rejects every draft
    reasoner = _reasoner(target, ScriptedBackend(SOLUTION), min_acceptance=0.5)
    first = await reasoner.ainvoke(IMAGE, "q?")
    assert first.stats.draft_steps_judged > 0 and reasoner.acceptance.value == 0.0
    later = [await reasoner.ainvoke(IMAGE, "q?") for _ in range(PROBE_EVERY)]
    reasons = [(r.stats.schedule.reason if r.stats.schedule else "") for r in later]
    assert sum(r.startswith("acceptance") for r in reasons) == PROBE_EVERY - 1
    assert reasons[-1].startswith("probe") and later[-1].stats.draft_steps_judged > 0
    assert all([s.text for s in r.steps] == SOLUTION for r in later)


@pytest.mark.asyncio
async def test_a_rows_mode_is_taken_with_the_folders_tau_for_it() -> None:
    table = (ScheduleRow(in_flight=4, lookahead=2, mode="likelihood"),)
    result = await _reasoner(Measured(SOLUTION), ScriptedBackend(SOLUTION), schedule=table).ainvoke(IMAGE, "q?")
    assert result.stats.schedule is not None and result.stats.schedule.mode == "likelihood"
    verdicts = [s.verdict for s in result.steps if s.verdict is not None]
    assert verdicts and all(v.tau == 0.25 for v in verdicts)  # likelihood's measured tau, not judge's 1.0
    # a folder that measured one mode only: the row's mode is not used
    plain = await _reasoner(AsyncScriptedBackend(SOLUTION), ScriptedBackend(SOLUTION), schedule=table).ainvoke(
        IMAGE, "q?"
    )
    assert all(s.verdict.tau == 1.0 for s in plain.steps if s.verdict is not None)


# ---------------------------------------------------------------------- calibrated on the machine
def test_the_fastest_lookahead_per_load_becomes_rows() -> None:
    rps: dict[int, dict[Candidate, float]] = {
        1: {(0, None): 1.0, (1, None): 1.5, (2, None): 2.0},
        2: {(0, None): 2.0, (1, None): 2.5, (2, None): 2.6},  # within 5%: the smaller lookahead
        4: {(0, None): 3.0, (1, None): 3.3, (2, None): 2.0},
        8: {(0, None): 6.0, (1, None): 4.0, (2, None): 3.0},
        16: {(0, None): 8.0, (1, None): 5.0, (2, None): 3.0},
    }
    assert choose_rows(rps) == (
        ScheduleRow(in_flight=1, lookahead=2),
        ScheduleRow(in_flight=4, lookahead=1),
        ScheduleRow(in_flight=UNLIMITED, lookahead=0),  # the last row holds above the loads measured
    )


@pytest.mark.asyncio
async def test_measuring_a_schedule_runs_every_candidate_and_writes_it_beside_the_settings(tmp_path: Path) -> None:
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "dreamr.json").write_text(json.dumps({"task": "grid", "verification": {"mode": "judge", "tau": 1.0}}))
    reasoner = _reasoner(AsyncScriptedBackend(SOLUTION), ScriptedBackend(SOLUTION))
    lines: list[str] = []
    c = await measure_schedule(reasoner, task="grid", n=2, levels=(1, 2), lookaheads=(0, 2), progress=lines.append)
    assert set(c.rps) == {1, 2} and all(set(by) == {(0, None), (2, None)} for by in c.rps.values())
    assert len(lines) == 2 and c.rows and c.rows[-1].in_flight == UNLIMITED
    out = write_schedule(c, settings, settings_from=settings)
    written = read_settings(out)
    assert written.task == "grid" and written.verification["tau"] == 1.0  # the TBVM settings kept
    assert tuple(ScheduleRow(**r) for r in written.schedule) == c.rows
    record = json.loads((out / "schedule.json").read_text())
    assert record["items"] == 2 and set(record["requests_per_s"]) == {"1", "2"}
    # a served target given these settings runs on the schedule
    target = VLLMBackend.connect("http://127.0.0.1:9/v1", settings_from=out, model="m")
    config = LoadedModels(target).recommended_config()
    assert config is not None and config.scheduling.schedule == c.rows and config.verification.tau == 1.0
    with pytest.raises(ConfigError, match="holds other files"):
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "model.safetensors").write_text("x")
        write_schedule(c, tmp_path / "model", settings_from=settings)


def test_a_bad_schedule_in_a_settings_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "dreamr.json").write_text(
        json.dumps({"schedule": [{"in_flight": 4, "lookahead": 1}, {"in_flight": 2}]})
    )
    with pytest.raises(ConfigError, match=r"dreamr.json: 'schedule'"):
        read_settings(tmp_path)


def test_calibrate_schedule_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dreamr_app.cli import main

    settings = tmp_path / "s"
    settings.mkdir()
    cases = [
        (["--target", str(settings)], "give --target-url"),
        (["--target-url", "http://127.0.0.1:9/v1"], "--settings FOLDER"),
        (["--target-url", "http://127.0.0.1:9/v1", "--settings", str(settings), "--levels", "4,2"], "increasing"),
        (["--target-url", "http://127.0.0.1:9/v1", "--settings", str(settings), "--lookaheads", "x"], "numbers"),
    ]
    for argv, message in cases:
        assert main(["calibrate", "--schedule", "--out", str(settings), *argv]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.asyncio
async def test_a_request_whose_draft_is_slow_goes_alone_as_soon_as_the_load_rises() -> None:
    """The load is watched during an epoch too: a request does not wait for a draft step under
    way (here 30 words at 50 ms) to end its epoch when the schedule now says the target alone."""
    long = ["w " * 29 + "end", "Answer: 2"]
    target = AsyncScriptedBackend(long)
    draft = ScriptedBackend(long, token_delay_s=0.05)  # a step of 30 words: 1.5 s, in chunks of 8 words
    reasoner = _reasoner(target, draft, schedule=(ScheduleRow(in_flight=1, lookahead=2),))
    results = await _at_once(reasoner, 3, gap_s=0.1)
    first = results[0]
    assert first.stats.schedule is not None and first.stats.schedule.lookahead == 2
    assert first.stats.target_alone_from == 0 and (first.stats.target_alone_reason or "").startswith("load")
    assert first.stats.wall_s < 1.0  # it left the draft's step after at most one chunk (0.4 s)
    assert all([s.text for s in r.steps] == [x.strip() for x in long] for r in results)
