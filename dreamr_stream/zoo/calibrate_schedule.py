"""``dreamr calibrate --schedule``: the speculation schedule measured where a target is served.

How far the draft should run ahead (0: the target alone) at each load depends on the machine:
the server's batching, the draft's cores, the network. So it is measured there, as vLLM users
measure their speculative lengths per batch size: at each load (requests in flight), FPSR runs
held-out items of the task (the val split) with every candidate lookahead (and TBVM mode, where
the target's folder measured both), the candidates interleaved in rotating order, and the one
with the most requests per second wins; a longer lookahead must beat every shorter one by more
than 5%, since it costs the server more and one round on a noisy machine differs by that much.
Consecutive loads with the same choice merge into one row; the last row holds for any load
above it. The rows go to ``dreamr.json`` ("schedule", ``SchedulingConfig.schedule``) beside
the folder's TBVM settings, and every figure to ``schedule.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio

from dreamr_stream.backends.settings import SETTINGS_FILE, read_settings
from dreamr_stream.config import ReasonerConfig, ScheduleRow
from dreamr_stream.engine.schedule import UNLIMITED
from dreamr_stream.errors import ConfigError
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks import TaskItem, TaskLike, as_task, items
from dreamr_stream.training import save_folder_atomic

__all__ = ["SCHEDULE_FILE", "Candidate", "ScheduleCalibration", "choose_rows", "measure_schedule", "write_schedule"]

SCHEDULE_FILE = "schedule.json"
LEVELS = (1, 2, 4, 8, 16, 32)
LOOKAHEADS = (0, 1, 2, 3)

Mode = Literal["judge", "likelihood"]
Candidate = tuple[int, Mode | None]  # (lookahead, TBVM mode; None: the folder's)


@dataclass
class ScheduleCalibration:
    """Requests/s of every candidate at every load, and the rows chosen from them."""

    task: str
    items: int
    rounds: int
    rps: dict[int, dict[Candidate, float]] = field(default_factory=dict)  # load -> candidate -> req/s
    rows: tuple[ScheduleRow, ...] = ()

    def record(self) -> dict[str, Any]:
        return {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "task": self.task,
            "split": "val",
            "items": self.items,
            "rounds": self.rounds,
            "requests_per_s": {
                str(load): {f"lookahead={la}" + (f",mode={m}" if m else ""): v for (la, m), v in by.items()}
                for load, by in self.rps.items()
            },
            "schedule": [r.model_dump(exclude_none=True) for r in self.rows],
        }


def choose_rows(rps: dict[int, dict[Candidate, float]], *, margin: float = 0.05) -> tuple[ScheduleRow, ...]:
    """Per load the fastest candidate, a longer lookahead only where it beats every shorter one
    by more than ``margin`` (speculating costs the server more: a draw goes to the cheaper);
    equal neighbours merged, the last row holding above the highest load measured."""
    best: list[tuple[int, Candidate]] = []
    for load in sorted(rps):
        chosen: Candidate | None = None
        for c, v in sorted(rps[load].items(), key=lambda cv: cv[0][0]):
            if chosen is None or v > rps[load][chosen] * (1 + margin):
                chosen = c
        assert chosen is not None
        best.append((load, chosen))
    rows: list[ScheduleRow] = []
    for i, (load, (lookahead, mode)) in enumerate(best):
        last = i == len(best) - 1
        if not last and best[i + 1][1] == (lookahead, mode):
            continue  # the next load chose the same: one row for both
        rows.append(ScheduleRow(in_flight=UNLIMITED if last else load, lookahead=lookahead, mode=mode))
    return tuple(rows)


def _config(base: ReasonerConfig, candidate: Candidate) -> ReasonerConfig:
    lookahead, mode = candidate
    row = ScheduleRow(in_flight=UNLIMITED, lookahead=lookahead, mode=mode)
    return base.override(scheduling={"schedule": (row,), "min_acceptance": 0.0})


async def _requests_per_s(reasoner: Reasoner, config: ReasonerConfig, cases: Sequence[TaskItem], load: int) -> float:
    gate = anyio.Semaphore(load)

    async def one(case: TaskItem) -> None:
        async with gate:
            await reasoner.ainvoke(case.image, case.question, config=config)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for case in cases:
            tg.start_soon(one, case)
    return len(cases) / (time.perf_counter() - t0)


async def measure_schedule(
    reasoner: Reasoner,
    *,
    task: TaskLike,
    n: int = 16,
    levels: Sequence[int] = LEVELS,
    lookaheads: Sequence[int] = LOOKAHEADS,
    modes: Sequence[Mode | None] = (None,),
    rounds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> ScheduleCalibration:
    """Measure every candidate at every load on ``n`` val items (trajectory cache off: each
    request does its full model work) and choose the rows."""
    chosen = as_task(task)
    cases = list(items(chosen, "val", n))
    base = reasoner.config.override(cache=False)
    candidates: list[Candidate] = [(la, m) for la in lookaheads for m in (modes if la else [None])]
    for c in candidates:  # warm every path once
        await reasoner.ainvoke(cases[0].image, cases[0].question, config=_config(base, c))
    result = ScheduleCalibration(task=chosen.name, items=n, rounds=rounds)
    for load in levels:
        # at least one item per request in flight, or the load is never reached
        batch = cases if len(cases) >= load else list(items(chosen, "val", load))
        totals: dict[Candidate, list[float]] = {c: [] for c in candidates}
        for r in range(rounds * len(candidates)):
            c = candidates[(r + load) % len(candidates)]  # rotating order: drift hits every candidate
            totals[c].append(await _requests_per_s(reasoner, _config(base, c), batch, load))
        result.rps[load] = {c: sum(v) / len(v) for c, v in totals.items()}
        if progress is not None:
            shown = ", ".join(
                f"lookahead {la}{' ' + m if m else ''}: {v:.2f}" for (la, m), v in result.rps[load].items()
            )
            progress(f"{load} in flight: {shown} req/s")
    result.rows = choose_rows(result.rps)
    return result


def write_schedule(calibration: ScheduleCalibration, out: str | Path, *, settings_from: str | Path | None) -> Path:
    """``out`` as a settings folder: ``settings_from``'s ``dreamr.json`` (its task, judge template
    and TBVM settings) with the schedule, and ``schedule.json``; whole or not at all. ``out`` may
    be ``settings_from`` itself (a folder ``dreamr calibrate`` wrote), or a new folder."""
    folder = Path(out)
    if folder.exists() and any(
        p.name not in {SETTINGS_FILE, SCHEDULE_FILE, "calibration.json"} for p in folder.iterdir()
    ):
        raise ConfigError(
            f"{folder} holds other files: not a settings folder; write the schedule to a folder of its own"
        )
    settings = read_settings(settings_from) if settings_from is not None else read_settings(folder)
    rows = tuple(r.model_dump(exclude_none=True) for r in calibration.rows)
    data = {**settings.to_dict(), "schedule": list(rows)}
    kept = Path(settings_from or folder) / "calibration.json"
    calibration_record = kept.read_text() if kept.is_file() else None

    def write(tmp: Path) -> None:
        (tmp / SETTINGS_FILE).write_text(json.dumps(data, indent=2) + "\n")
        (tmp / SCHEDULE_FILE).write_text(json.dumps(calibration.record(), indent=2) + "\n")
        if calibration_record is not None:  # the TBVM figures behind the settings stay beside them
            (tmp / "calibration.json").write_text(calibration_record)

    return save_folder_atomic(write, folder)
