"""FPSR over a served target against the target served alone, on a task's test items (the grid
task's unless told), at given loads.

The methods, each with ``C`` requests in flight (a semaphore) per concurrency level:

* ``plain`` (when a ``PlainClient`` is given): what a user of the server alone sends, one
  ordinary chat completion per question (image and question, greedy, not streamed): the
  baseline;
* ``target_only``: dreamr's target-alone path over the same server (the steps of one streamed
  completion), the path a request takes when the schedule sends it to the target alone: its
  cost against ``plain`` is the price of going through dreamr;
* ``fpsr``: FPSR over the server with its draft.

Each round runs every puzzle once per method; the methods' order rotates round by round so that
drift hits all. Reported per level: total wall time, requests/s and their ratio against the
baseline (``plain``, else ``target_only``), the median of per-puzzle latency ratios, accuracy
against each puzzle's known answer, how many of dreamr's target-alone answers equal the plain
request's text, and FPSR's acceptance, repaired steps and the share of requests the load-aware
switch gave to the target alone. Used by ``dreamr bench --target-url`` and
``benchmarks/vllm_load.py``.
"""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from PIL import Image

from dreamr_stream.config import ReasonerConfig
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.store import image_png
from dreamr_stream.tasks import DEFAULT_TASK, TaskItem, TaskLike, as_task, items
from dreamr_stream.types import ReasoningResult
from dreamr_vllm.metrics import cpu_seconds, delta, read_metrics

__all__ = ["METHODS", "Level", "PlainClient", "plot", "run_levels", "to_markdown"]

METHODS: tuple[str, ...] = ("plain", "target_only", "fpsr")
LABEL = {"plain": "vLLM alone", "target_only": "target alone via dreamr", "fpsr": "FPSR over vLLM"}


class PlainClient:
    """The server asked as a user of it alone asks: one chat completion per question (the image
    as a ``data:`` URL and the question, greedy, not streamed), on one pooled connection set."""

    def __init__(self, url: str, *, model: str | None = None, timeout_s: float = 300.0) -> None:
        self.url, self.model = url.rstrip("/"), model
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=timeout_s, limits=limits)

    async def answer(self, image: Image.Image, question: str) -> str:
        if self.model is None:
            r = await self.client.get(self.url + "/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        png = await anyio.to_thread.run_sync(image_png, image)
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "text", "text": question},
        ]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0.0}
        r = await self.client.post(self.url + "/chat/completions", json=body)
        r.raise_for_status()
        return str(r.json()["choices"][0]["message"]["content"] or "")

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass
class Level:
    concurrency: int
    methods: tuple[str, ...] = METHODS
    wall_s: dict[str, list[float]] = field(default_factory=dict)
    latency: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)
    texts: dict[str, dict[int, str]] = field(default_factory=dict)  # each puzzle's whole answer, per method
    server: dict[str, dict[str, float]] = field(default_factory=dict)  # what the server spent, per method
    spans: dict[str, dict[str, float]] = field(default_factory=dict)  # dreamr's seconds per lane:what, per method
    server_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # the server's CPU seconds per round
    steps: dict[str, int] = field(default_factory=dict)  # reasoning steps answered, per method
    judged: int = 0
    accepted: int = 0
    repaired: int = 0
    alone: int = 0
    requests: int = 0

    def __post_init__(self) -> None:
        for m in self.methods:
            self.wall_s[m], self.latency[m], self.texts[m], self.server[m], self.spans[m] = [], {}, {}, {}, {}
            self.server_cpu_s[m] = []
            self.steps[m] = 0
            self.correct[m] = self.answered[m] = 0


@dataclass
class _Methods:
    """What answers each method: the Reasoners (dreamr's methods) and the plain client."""

    reasoners: dict[str, Reasoner]
    plain: PlainClient | None
    config: ReasonerConfig
    task: TaskLike
    server_url: str | None = None  # the server whose /metrics each round reads
    server_pid: int | None = None  # its process here, whose CPU seconds each round reads
    client: httpx.AsyncClient = field(default_factory=httpx.AsyncClient)

    async def run(self, method: str, p: TaskItem) -> tuple[str, str | None, ReasoningResult | None]:
        """(the whole answer's text, the answer, dreamr's result)"""
        if method == "plain":
            assert self.plain is not None
            text = await self.plain.answer(p.image, p.question)
            parsed = as_task(self.task).parse_answer(text)
            return text, None if parsed is None else str(parsed), None
        result = await self.reasoners[method].ainvoke(p.image, p.question, method=method, config=self.config)  # type: ignore[arg-type]
        return "\n".join(s.text for s in result.steps), result.answer, result


async def _round(methods: _Methods, puzzles: list[TaskItem], method: str, level: Level) -> None:
    gate = anyio.Semaphore(level.concurrency)

    async def one(i: int, p: TaskItem) -> None:
        async with gate:
            t0 = time.perf_counter()
            text, answer, result = await methods.run(method, p)
            level.latency[method].setdefault(i, []).append(time.perf_counter() - t0)
        level.answered[method] += 1
        level.correct[method] += answer is not None and answer.strip() == str(p.answer)
        level.texts[method][i] = text
        level.steps[method] += text.count("\n") + 1 if text else 0
        if result is not None:
            for span in result.stats.timeline:
                key = f"{span.lane}:{span.what}"
                level.spans[method][key] = level.spans[method].get(key, 0.0) + span.end_s - span.start_s
        if result is not None and method == "fpsr":
            st = result.stats
            level.requests += 1
            level.judged += st.draft_steps_judged
            level.accepted += st.draft_steps_accepted
            level.repaired += st.steps_repaired
            level.alone += st.target_alone_from is not None and (st.target_alone_reason or "").startswith("load")

    url, pid = methods.server_url, methods.server_pid
    before = await read_metrics(methods.client, url) if url else None
    cpu0 = cpu_seconds(pid) if pid else None
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, p in enumerate(puzzles):
            tg.start_soon(one, i, p)
    level.wall_s[method].append(time.perf_counter() - t0)
    cpu1 = cpu_seconds(pid) if pid else None
    spent = delta(before, await read_metrics(methods.client, url) if url else None) or {}
    if cpu0 is not None and cpu1 is not None:
        spent["cpu_s"] = cpu1 - cpu0
        level.server_cpu_s[method].append(cpu1 - cpu0)
    for k, v in spent.items():
        level.server[method][k] = level.server[method].get(k, 0.0) + v


def _summary(level: Level, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": level.concurrency}
    for m in level.methods:
        total = sum(level.wall_s[m])
        latencies = [x for per_puzzle in level.latency[m].values() for x in per_puzzle]
        out[m] = {
            "wall_s": level.wall_s[m],
            "requests_per_s": level.answered[m] / total,
            "accuracy": level.correct[m] / max(1, level.answered[m]),
            "median_latency_s": statistics.median(latencies) if latencies else None,
            "steps_per_request": level.steps[m] / max(1, level.answered[m]),
        }
    base = "plain" if "plain" in level.methods else "target_only"
    out["baseline"] = base
    ratios = [statistics.median(level.latency[base][i]) / statistics.median(level.latency["fpsr"][i]) for i in range(n)]
    out["throughput_ratio"] = out["fpsr"]["requests_per_s"] / out[base]["requests_per_s"]
    out["median_latency_ratio"] = statistics.median(ratios)
    if base == "plain":
        # what dreamr's target-alone path costs the server against the plain request
        out["target_alone_cost"] = out["plain"]["requests_per_s"] / out["target_only"]["requests_per_s"]
        cpu = level.server_cpu_s
        if cpu["plain"] and cpu["target_only"]:  # the server's CPU per request: robust to other load
            out["target_alone_cpu_cost"] = sum(cpu["target_only"]) / sum(cpu["plain"])
            out["target_alone_cpu_cost_rounds"] = [
                t / p for p, t in zip(cpu["plain"], cpu["target_only"], strict=False)
            ]
        out["target_alone_same_text"] = sum(
            level.texts["target_only"].get(i) == level.texts["plain"].get(i) for i in range(n)
        )
    out["where_time_goes"] = {m: _costs(level, m) for m in level.methods}
    out["acceptance"] = level.accepted / max(1, level.judged)
    out["repaired_steps_per_request"] = level.repaired / max(1, level.requests)
    out["switched_to_target_alone"] = level.alone / max(1, level.requests)
    return out


def _costs(level: Level, method: str) -> dict[str, float]:
    """Per request of ``method``: the server's work (/metrics) and dreamr's spans, in seconds."""
    n = max(1, level.answered[method])
    server = level.server[method]
    out = {f"server_{k}": v / n for k, v in server.items()}
    if server.get("prefix_cache_queries"):
        out["prefix_cache_hit_rate"] = server["prefix_cache_hits"] / server["prefix_cache_queries"]
    out |= {k: v / n for k, v in sorted(level.spans[method].items())}
    return out


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    plain = bool(rows) and rows[0].get("baseline") == "plain"
    lines = [
        "# FPSR over vLLM vs vLLM alone",
        "",
        f"`{meta['command']}`, {meta['when']}, {meta['machine']}; {meta['puzzles']} test puzzles, "
        f"{meta['rounds']} rounds per method, methods alternating. {meta.get('setup', '')}".rstrip(),
        "",
    ]
    if plain:
        lines.append(
            "vLLM alone: one plain chat completion per question. Target alone via dreamr: the path a request "
            "takes when sent to the target alone (one streamed completion cut into steps); its cost is vLLM "
            "alone's requests/s over its own."
        )
        lines.append("")
    head = "| requests in flight | vLLM alone req/s | FPSR over vLLM req/s | throughput ratio | median latency ratio "
    head += "| accuracy (alone / FPSR) | acceptance | repaired steps per request | sent to target alone |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if plain:
        head += " target alone via dreamr req/s | its cost (time) | its cost (server CPU) | same text |"
        rule += "---|---|---|---|"
    lines += [head, rule]
    for r in rows:
        t, f = r[r.get("baseline", "target_only")], r["fpsr"]
        line = (
            f"| {r['concurrency']} | {t['requests_per_s']:.2f} | {f['requests_per_s']:.2f} | "
            f"**{r['throughput_ratio']:.2f}x** | {r['median_latency_ratio']:.2f}x | "
            f"{t['accuracy']:.0%} / {f['accuracy']:.0%} | {r['acceptance']:.0%} | "
            f"{r['repaired_steps_per_request']:.1f} | {r['switched_to_target_alone']:.0%} |"
        )
        if plain:
            cpu = r.get("target_alone_cpu_cost")
            line += (
                f" {r['target_only']['requests_per_s']:.2f} | {r['target_alone_cost']:.3f}x "
                f"| {'-' if cpu is None else f'{cpu:.3f}x'} | {r['target_alone_same_text']}/{meta['puzzles']} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n" + _costs_markdown(rows)


def _costs_markdown(rows: list[dict[str, Any]]) -> str:
    """Where each method's time goes, per request: the server's work and dreamr's lanes."""
    if not rows or "where_time_goes" not in rows[0]:
        return ""
    lines = [
        "",
        "Where the time goes, per request (the server's own counters from `/metrics`; dreamr's lanes from each "
        "result's timeline, summed over overlapping lanes):",
        "",
        "| in flight | method | server requests | prompt tokens | prefix-cache hits | generated tokens | server CPU s "
        "| server queue s | server prefill s | server decode s | draft write s | verify s | target write s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for m, c in r["where_time_goes"].items():
            lines.append(
                f"| {r['concurrency']} | {LABEL.get(m, m)} | {c.get('server_requests', 0):.1f} | "
                f"{c.get('server_prompt_tokens', 0):.0f} | {c.get('prefix_cache_hit_rate', 0):.0%} | "
                f"{c.get('server_generated_tokens', 0):.0f} | {c.get('server_cpu_s', 0):.3f} | "
                f"{c.get('server_queue_s', 0):.3f} | "
                f"{c.get('server_prefill_s', 0):.3f} | {c.get('server_decode_s', 0):.3f} | "
                f"{c.get('draft:write', 0):.3f} | {c.get('verify:judge', 0):.3f} | {c.get('target:write', 0):.3f} |"
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
    plain: PlainClient | None = None,
    server_url: str | None = None,
    server_pid: int | None = None,
) -> list[dict[str, Any]]:
    """``reasoners``: the Reasoner for each of dreamr's methods (``target_only``, ``fpsr``); they
    may be one. ``plain``: the server asked directly, the baseline (left out without it).
    ``server_url``: the API base of a vLLM server whose ``/metrics`` tell each method's cost on
    it; ``server_pid``: its process on this machine, whose CPU seconds do. The puzzles are test
    items ``seed0 .. seed0 + puzzles - 1`` of ``task``."""
    cases = list(items(task, "test", puzzles, start=seed0))
    used = tuple(m for m in METHODS if m != "plain" or plain is not None)
    methods = _Methods(reasoners, plain, config, task, server_url=server_url, server_pid=server_pid)
    for m in used:  # warm every path (the server's caches, the draft's first call)
        await methods.run(m, cases[0])
    rows = []
    for c in concurrency:
        level = Level(c, used)
        for r in range(rounds):
            for m in used[r % len(used) :] + used[: r % len(used)]:  # each method goes first in turn
                await _round(methods, cases, m, level)
        row = _summary(level, len(cases))
        rows.append(row)
        if report is not None:
            report(row)
    await methods.client.aclose()
    return rows


def plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Requests/s and median latency against requests in flight, one line per method (needs
    matplotlib, the ``plot`` extra; None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    loads = [r["concurrency"] for r in rows]
    fig, (rps, lat) = plt.subplots(1, 2, figsize=(10, 4))
    for m in METHODS:
        if m not in rows[0]:
            continue
        rps.plot(loads, [r[m]["requests_per_s"] for r in rows], marker="o", label=LABEL[m])
        lat.plot(loads, [r[m]["median_latency_s"] for r in rows], marker="o", label=LABEL[m])
    for ax, what in ((rps, "requests/s"), (lat, "median latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(loads, [str(x) for x in loads])
        ax.set_xlabel("requests in flight")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    rps.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
