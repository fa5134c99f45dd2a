"""FPSR over a served target against the target served alone, on a task's test items (the grid
task's unless told), at given loads.

Per concurrency level ``C``, each round runs every puzzle once per method with ``C`` requests
in flight (a semaphore); methods alternate round by round so that drift hits both. Reported per
level: total wall time, requests/s and their ratio (FPSR over the target alone), the median of
per-puzzle latency ratios, accuracy against each puzzle's known answer, and FPSR's acceptance,
repaired steps and the share of requests the load-aware switch gave to the target alone.
Used by ``dreamr bench --target-url`` and ``benchmarks/vllm_load.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from dreamr_stream.config import ReasonerConfig
from dreamr_stream.reasoner import Method, Reasoner
from dreamr_stream.tasks import DEFAULT_TASK, TaskItem, TaskLike, items
from dreamr_stream.types import ReasoningResult

__all__ = ["METHODS", "Level", "run_levels", "to_markdown"]

METHODS: tuple[Method, ...] = ("target_only", "fpsr")
LABEL = {"target_only": "vLLM alone", "fpsr": "FPSR over vLLM"}


@dataclass
class Level:
    concurrency: int
    wall_s: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    latency: dict[str, dict[int, list[float]]] = field(default_factory=lambda: {m: {} for m in METHODS})
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHODS, 0))
    answered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHODS, 0))
    judged: int = 0
    accepted: int = 0
    repaired: int = 0
    alone: int = 0
    requests: int = 0


async def _round(
    reasoners: dict[str, Reasoner], puzzles: list[TaskItem], method: Method, level: Level, config: ReasonerConfig
) -> None:
    reasoner = reasoners[method]
    gate = anyio.Semaphore(level.concurrency)

    async def one(i: int, p: TaskItem) -> None:
        async with gate:
            t0 = time.perf_counter()
            result: ReasoningResult = await reasoner.ainvoke(p.image, p.question, method=method, config=config)
            level.latency[method].setdefault(i, []).append(time.perf_counter() - t0)
        level.answered[method] += 1
        level.correct[method] += result.answer is not None and result.answer.strip() == str(p.answer)
        if method == "fpsr":
            st = result.stats
            level.requests += 1
            level.judged += st.draft_steps_judged
            level.accepted += st.draft_steps_accepted
            level.repaired += st.steps_repaired
            level.alone += st.target_alone_from is not None and (st.target_alone_reason or "").startswith("load")

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, p in enumerate(puzzles):
            tg.start_soon(one, i, p)
    level.wall_s[method].append(time.perf_counter() - t0)


def _summary(level: Level, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": level.concurrency}
    for m in METHODS:
        total = sum(level.wall_s[m])
        out[m] = {
            "wall_s": level.wall_s[m],
            "requests_per_s": level.answered[m] / total,
            "accuracy": level.correct[m] / max(1, level.answered[m]),
        }
    ratios = [
        statistics.median(level.latency["target_only"][i]) / statistics.median(level.latency["fpsr"][i])
        for i in range(n)
    ]
    out["throughput_ratio"] = out["fpsr"]["requests_per_s"] / out["target_only"]["requests_per_s"]
    out["median_latency_ratio"] = statistics.median(ratios)
    out["acceptance"] = level.accepted / max(1, level.judged)
    out["repaired_steps_per_request"] = level.repaired / max(1, level.requests)
    out["switched_to_target_alone"] = level.alone / max(1, level.requests)
    return out


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# FPSR over vLLM vs vLLM alone",
        "",
        f"`{meta['command']}`, {meta['when']}, {meta['machine']}; {meta['puzzles']} test puzzles, "
        f"{meta['rounds']} rounds per method, methods alternating. {meta.get('setup', '')}".rstrip(),
        "",
        "| requests in flight | vLLM alone req/s | FPSR over vLLM req/s | throughput ratio | median latency ratio "
        "| accuracy (alone / FPSR) | acceptance | repaired steps per request | sent to target alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, f = r["target_only"], r["fpsr"]
        lines.append(
            f"| {r['concurrency']} | {t['requests_per_s']:.2f} | {f['requests_per_s']:.2f} | "
            f"**{r['throughput_ratio']:.2f}x** | {r['median_latency_ratio']:.2f}x | "
            f"{t['accuracy']:.0%} / {f['accuracy']:.0%} | {r['acceptance']:.0%} | "
            f"{r['repaired_steps_per_request']:.1f} | {r['switched_to_target_alone']:.0%} |"
        )
    return "\n".join(lines) + "\n"


async def run_levels(
    reasoners: dict[str, Reasoner],
    config: ReasonerConfig,
    *,
    puzzles: int,
    concurrency: list[int],
    rounds: int,
    seed0: int = 0,
    report: Callable[[dict[str, Any]], None] | None = None,
    task: TaskLike = DEFAULT_TASK,
) -> list[dict[str, Any]]:
    """``reasoners``: the Reasoner for each method (``target_only``, ``fpsr``); they may be one.
    The puzzles are test items ``seed0 .. seed0 + puzzles - 1`` of ``task``."""
    cases = list(items(task, "test", puzzles, start=seed0))
    for m in METHODS:  # warm both paths (the server's caches, the draft's first call)
        await reasoners[m].ainvoke(cases[0].image, cases[0].question, method=m, config=config)
    rows = []
    for c in concurrency:
        level = Level(c)
        for r in range(rounds):
            for m in METHODS if r % 2 == 0 else METHODS[::-1]:
                await _round(reasoners, cases, m, level, config)
        row = _summary(level, len(cases))
        rows.append(row)
        if report is not None:
            report(row)
    return rows
