"""Soak test for ``dreamr serve``: clients asking, cancelling and leaving at random for minutes.

    python benchmarks/soak.py [--minutes 10] [--warmup-minutes 2] [--clients 8] [--seed 0]
                              [--max-active 4] [--sample-s 5] [--out benchmarks/results/soak]

Starts ``dreamr serve --port 0`` (loopback, the shipped demo models) in its own process, then
``--clients`` WebSocket clients, each repeating one action drawn at random until the time is up:

* ask and read to the answer (every answer to a puzzle must equal the first one given for it:
  greedy runs are deterministic; a third of the asks turn the trajectory cache off);
* ask, then cancel after 0-4 of the request's events (``cancelled``, or ``stats`` when it
  finished first);
* ask, then leave after 0-4 events: half close the WebSocket, half abort the TCP connection;
* close the connection and open a new one.

Every ``--sample-s`` seconds it reads the server's ``/stats`` and, from ``/proc``, the resident
memory (RSS), open file descriptors and threads of the server and of its child processes (the
draft's process). The first ``--warmup-minutes`` are warm-up (allocator pools, caches filling);
RSS growth is measured from the mean of the minute after warm-up to the mean of the last minute
of load. After the load: every client gone, ``/stats`` must show no connection, request, queued
request or model call within 10 s, and the idle descriptor count must equal the one measured
idle before the load (after one warm-up request; each idle sample ``--idle-wait-s`` after the
last request); then a fresh request must be
answered, and the server must stop on SIGINT.

Must hold (the verdict): 0 errors (client-side errors, error events, unexpected closes, answers
differing between runs of one puzzle, tracebacks or failures in the server's log and totals),
RSS growth <= 10% after warm-up, no descriptors, processes, requests or model calls left after
the load (threads are reported beside them: worker pools may keep idle threads).
Results: ``<out>.json`` (every sample) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import serve_process
from serve_process import ServeProcess, code_version, http_json, idle_stats, tree_sample
from websockets.asyncio.client import ClientConnection, connect

from dreamr_stream.tasks import get_task, items

TERMINAL = {"stats", "error", "cancelled"}
ACTIONS: tuple[tuple[str, float], ...] = (("ask", 0.45), ("cancel", 0.2), ("leave", 0.25), ("reconnect", 0.1))
PAGE = 4096


# --- talking to the server ---------------------------------------------------------------------


@dataclass
class Puzzle:
    image_b64: str
    question: str


def puzzles(n: int) -> list[Puzzle]:
    out = []
    for item in items(get_task(), "test", n, start=70_000):
        buf = io.BytesIO()
        item.image.save(buf, format="PNG")
        out.append(Puzzle(base64.b64encode(buf.getvalue()).decode(), item.question))
    return out


@dataclass
class Tally:
    actions: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    answers: dict[int, str | None] = field(default_factory=dict)  # puzzle -> the first answer given
    latencies: list[float] = field(default_factory=list)
    late: list[str] = field(default_factory=list)  # messages of a request after its terminal one

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


class Client:
    """One client: a connection it keeps between actions, and a random stream of actions."""

    def __init__(self, index: int, url: str, bank: list[Puzzle], tally: Tally, seed: int) -> None:
        self.index, self.url, self.bank, self.tally = index, url, bank, tally
        self.rng = random.Random(seed * 1000 + index)
        self.ws: ClientConnection | None = None
        self.n = 0

    async def connection(self) -> ClientConnection:
        if self.ws is None:
            self.ws = await connect(self.url, compression=None, max_size=None, open_timeout=60)
            hello = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if hello.get("type") != "hello":
                raise RuntimeError(f"expected hello, got {hello}")
        return self.ws

    async def send_ask(self) -> tuple[ClientConnection, str, int]:
        ws = await self.connection()
        k = self.rng.randrange(len(self.bank))
        puzzle, rid = self.bank[k], f"c{self.index}-{self.n}"
        self.n += 1
        options = {"cache": False} if self.rng.random() < 1 / 3 else {}
        ask = {"v": 1, "type": "ask", "id": rid, "image": puzzle.image_b64, "question": puzzle.question}
        await ws.send(json.dumps({**ask, "options": options}))
        return ws, rid, k

    async def read(self, ws: ClientConnection, rid: str) -> dict[str, Any]:
        """The next message of request ``rid``; one of an earlier request is counted and skipped
        (a request must end in exactly one of stats, error or cancelled)."""
        while True:
            message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 300))
            if message.get("id") in (None, rid):
                return message
            self.tally.late.append(f"{message['type']} for {message['id']} while {rid} ran")

    def terminal(self, message: dict[str, Any], rid: str, k: int, allowed: set[str]) -> None:
        kind = message["type"]
        self.tally.count(self.tally.outcomes, kind)
        if kind not in allowed:
            self.tally.errors.append(f"{rid}: {kind} {message.get('code')} {message.get('message')}")

    async def ask(self) -> None:
        ws, rid, k = await self.send_ask()
        t0, answer = time.perf_counter(), None
        while (m := await self.read(ws, rid))["type"] not in TERMINAL:
            if m["type"] == "answer":
                answer = m["answer"]
        self.terminal(m, rid, k, {"stats"})
        if m["type"] == "stats":
            self.tally.latencies.append(time.perf_counter() - t0)
            first = self.tally.answers.setdefault(k, answer)
            if answer != first:
                self.tally.errors.append(f"{rid}: puzzle {k} answered {answer!r}, earlier {first!r}")

    async def cancel(self) -> None:
        ws, rid, k = await self.send_ask()
        for _ in range(self.rng.randrange(5)):
            m = await self.read(ws, rid)
            if m["type"] in TERMINAL:  # it finished before we cancelled
                self.terminal(m, rid, k, {"stats"})
                return
        await ws.send(json.dumps({"v": 1, "type": "cancel"}))
        while (m := await self.read(ws, rid))["type"] not in TERMINAL:
            pass
        self.terminal(m, rid, k, {"cancelled", "stats"})

    async def leave(self) -> None:
        ws, rid, k = await self.send_ask()
        for _ in range(self.rng.randrange(5)):
            m = await self.read(ws, rid)
            if m["type"] in TERMINAL:
                self.terminal(m, rid, k, {"stats"})
                break
        self.ws = None
        if self.rng.random() < 0.5:
            ws.transport.abort()
            self.tally.count(self.tally.outcomes, "left (abort)")
        else:
            await ws.close()
            self.tally.count(self.tally.outcomes, "left (close)")

    async def reconnect(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None
        await self.connection()

    async def run(self, deadline: float) -> None:
        names, weights = [a for a, _ in ACTIONS], [w for _, w in ACTIONS]
        while time.monotonic() < deadline:
            action = self.rng.choices(names, weights)[0]
            self.tally.count(self.tally.actions, action)
            try:
                await getattr(self, action)()
            except Exception as e:  # a failed action is an error of the run; start again connected afresh
                self.tally.errors.append(f"client {self.index} {action}: {type(e).__name__}: {e}")
                if self.ws is not None:
                    self.ws.transport.abort()
                self.ws = None
        if self.ws is not None:
            await self.ws.close()
            self.ws = None


# --- the run -----------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, log: Path) -> ServeProcess:
    # every client is on this machine's loopback address: lift what one address may take
    flags = ["--max-active", str(args.max_active), "--requests-per-minute", "0"]
    return serve_process.start_server([*flags, "--max-connections-per-address", str(args.clients + 2)], log)


async def soak(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/ws"
    bank = puzzles(args.puzzles)
    # one request first, so the idle baseline has the models' threads and pools in place
    warm = Client(-1, url, bank, Tally(), args.seed)
    await warm.ask()
    assert warm.ws is not None
    await warm.ws.close()
    before, _ = await idle_stats(port, 10)
    await asyncio.sleep(args.idle_wait_s)  # idle worker threads time out
    idle_before = tree_sample(pid)

    tally, samples = Tally(), []
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            s = await http_json(port, "/stats")
            sample = {"t_s": time.monotonic() - t0, **tree_sample(pid)}
            sample["stats"] = {k: v for k, v in s.items() if k not in ("v", "totals")}
            samples.append(sample)
            try:
                await asyncio.wait_for(stop.wait(), args.sample_s)
            except TimeoutError:
                pass

    watcher = asyncio.create_task(sampler())
    clients = [Client(i, url, bank, tally, args.seed) for i in range(args.clients)]
    await asyncio.gather(*(c.run(deadline) for c in clients))
    load_s = time.monotonic() - t0
    stop.set()
    await watcher

    after, drain_s = await idle_stats(port, 10)
    await asyncio.sleep(args.idle_wait_s)
    idle_after = tree_sample(pid)
    fresh = Client(-2, url, bank, Tally(), args.seed)
    await fresh.ask()
    fresh_ok = not fresh.tally.errors and fresh.tally.outcomes == {"stats": 1}
    assert fresh.ws is not None
    await fresh.ws.close()
    final = await http_json(port, "/stats")
    return {
        "load_s": load_s,
        "stats_before": before,
        "idle_before": idle_before,
        "samples": samples,
        "stats_after": after,
        "drain_s": drain_s,
        "idle_after": idle_after,
        "fresh_request_ok": fresh_ok,
        "totals": final["totals"],
        "actions": tally.actions,
        "outcomes": tally.outcomes,
        "errors": tally.errors,
        "late_messages": tally.late,
        "completed": len(tally.latencies),
        "latency_p50_s": statistics.median(tally.latencies) if tally.latencies else None,
        "puzzles_answered": len(tally.answers),
    }


def mean_rss(samples: list[dict[str, Any]], lo: float, hi: float, key: str) -> float:
    values = [s[key]["rss"] if key == "server" else s[key] for s in samples if lo <= s["t_s"] < hi]
    return statistics.fmean(values) if values else float("nan")


def slope_mib_per_min(samples: list[dict[str, Any]], lo: float) -> float:
    pts = [(s["t_s"] / 60, s["total_rss"] / 2**20) for s in samples if s["t_s"] >= lo]
    if len(pts) < 2:
        return 0.0
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0


def summarise(r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    warm, end = args.warmup_minutes * 60, r["load_s"]
    growth = {}
    for key in ("server", "total_rss"):
        a, b = mean_rss(r["samples"], warm, warm + 60, key), mean_rss(r["samples"], end - 60, end + 1, key)
        growth[key] = {"after_warmup_mib": a / 2**20, "last_minute_mib": b / 2**20, "growth": b / a - 1}
    peak = {
        k: max(s["stats"][k] for s in r["samples"])
        for k in ("connections", "active_requests", "queued", "in_flight", "engine_requests")
    }
    before, after = r["idle_before"], r["idle_after"]
    leaks = {
        "fds": after["total_fds"] - before["total_fds"],
        "child_processes": len(after["children"]) - len(before["children"]),
        "model_calls_in_flight": r["stats_after"]["in_flight"],
        "engine_requests": r["stats_after"]["engine_requests"],
        "active_or_queued": r["stats_after"]["active_requests"] + r["stats_after"]["queued"],
        "connections": r["stats_after"]["connections"],
    }
    server_errors = r["server_log"]["tracebacks"] + sum(r["totals"].get(k, 0) for k in ("failed", "internal_errors"))
    errors = len(r["errors"]) + len(r["late_messages"]) + server_errors
    verdict = (
        errors == 0
        and growth["total_rss"]["growth"] <= 0.10
        and all(v == 0 for v in leaks.values())
        and r["fresh_request_ok"]
        and r["server_exit"]["code"] == 0
    )
    return {
        "rss": growth,
        "rss_slope_after_warmup_mib_per_min": slope_mib_per_min(r["samples"], warm),
        "peak": peak,
        "leaks": leaks,
        "threads_idle_after_minus_before": after["total_threads"] - before["total_threads"],
        "errors": errors,
        "server_errors": server_errors,
        "pass": verdict,
    }


def to_markdown(r: dict[str, Any]) -> str:
    s, a = r["summary"], r["args"]
    b, f = r["idle_before"], r["idle_after"]
    mib = 2**20

    def row(name: str, x: dict[str, Any]) -> str:
        kids = ", ".join(f"{v['rss'] / mib:.0f} MiB / {v['fds']} / {v['threads']}" for v in x["children"].values())
        srv = x["server"]
        return (
            f"| {name} | {srv['rss'] / mib:.0f} MiB / {srv['fds']} / {srv['threads']} | {kids or '-'} | "
            f"{x['total_rss'] / mib:.0f} MiB / {x['total_fds']} / {x['total_threads']} |"
        )

    lines = [
        "# `dreamr serve` soak: clients asking, cancelling and leaving at random",
        "",
        f"`{r['command']}`, {r['date']}, code {r['code']}, on {r['machine']}; server `{r['server_command']}` "
        "(loopback, the "
        f"shipped demo target and SAPO draft, the draft in its own process); 1-minute load average before "
        f"the run {r['loadavg_before']:.2f}.",
        "",
        f"{a['clients']} clients for {a['minutes']:g} minutes ({r['load_s']:.0f} s), each repeating a random action "
        "(ask and read to the answer; ask and cancel after 0-4 events; ask and leave after 0-4 events, half "
        "closing, half aborting the TCP connection; reconnect) over "
        f"{a['puzzles']} puzzles, a third of the asks with the trajectory cache off. Process memory and "
        f"descriptors sampled every {a['sample_s']:g} s from /proc; the first {a['warmup_minutes']:g} minutes "
        "are warm-up.",
        "",
        f"**Verdict: {'PASS' if s['pass'] else 'FAIL'}** ({s['errors']} errors; RSS growth after warm-up "
        f"{s['rss']['total_rss']['growth']:+.1%}; left after the load: "
        + ", ".join(f"{k.replace('_', ' ')} {v:+d}" for k, v in s["leaks"].items())
        + f"; threads idle after minus before {s['threads_idle_after_minus_before']:+d}).",
        "",
        "## Traffic",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| actions | {json.dumps(r['actions'])} |",
        f"| request outcomes | {json.dumps(r['outcomes'])} |",
        f"| answered requests / distinct puzzles / median latency | {r['completed']} / {r['puzzles_answered']} / "
        f"{r['latency_p50_s'] or 0:.2f} s |",
        f"| errors (clients, events, answers differing between runs) | {len(r['errors'])} |",
        f"| messages of a request after its terminal message | {len(r['late_messages'])} |",
        f"| server log: tracebacks / other lines | {r['server_log']['tracebacks']} / {r['server_log']['lines']} |",
        f"| server totals | `{json.dumps(r['totals'])}` |",
        f"| peak connections / active / queued / in-flight model calls | {s['peak']['connections']} / "
        f"{s['peak']['active_requests']} / {s['peak']['queued']} / {s['peak']['in_flight']} |",
        f"| after the load: `/stats` idle within | {r['drain_s']:.2f} s |",
        f"| a fresh request afterwards | {'answered' if r['fresh_request_ok'] else 'FAILED'} |",
        f"| SIGINT to exit | {r['server_exit']['stop_s']:.1f} s, exit code {r['server_exit']['code']} |",
        "",
        "## Memory and descriptors",
        "",
        "RSS / open descriptors / threads, idle (no connection) before and after the load:",
        "",
        "| when | server | draft process | total |",
        "| --- | --- | --- | --- |",
        row("idle before (after one request)", b),
        row("idle after", f),
        "",
        "| RSS (total of server and draft process) | MiB |",
        "| --- | --- |",
        f"| mean of the minute after warm-up | {s['rss']['total_rss']['after_warmup_mib']:.1f} |",
        f"| mean of the last minute of load | {s['rss']['total_rss']['last_minute_mib']:.1f} |",
        f"| growth | {s['rss']['total_rss']['growth']:+.1%} (server alone {s['rss']['server']['growth']:+.1%}) |",
        f"| trend after warm-up (least squares) | {s['rss_slope_after_warmup_mib_per_min']:+.2f} MiB/min |",
        "",
        "RSS over time (total, MiB, one sample a minute):",
        "",
        "```",
    ]
    by_minute: dict[int, dict[str, Any]] = {}
    for x in r["samples"]:
        by_minute.setdefault(int(x["t_s"] // 60), x)
    for minute, x in sorted(by_minute.items()):
        lines.append(
            f"{minute:3d} min  {x['total_rss'] / mib:7.1f}  fds {x['total_fds']:4d}  threads {x['total_threads']:3d}"
            f"  connections {x['stats']['connections']}"
        )
    lines += ["```"]
    if r["errors"] or r["late_messages"] or r["server_log"]["excerpt"]:
        lines += ["", "## Problems", "", *[f"- {e}" for e in (r["errors"] + r["late_messages"])[:20]]]
        if r["server_log"]["excerpt"]:
            lines += ["", "Server log (first lines):", "", "```", *r["server_log"]["excerpt"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="load duration, warm-up included")
    ap.add_argument("--warmup-minutes", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--puzzles", type=int, default=24)
    ap.add_argument("--max-active", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--idle-wait-s", type=float, default=15.0, help="idle time before each idle sample")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak")
    args = ap.parse_args()
    if args.minutes > 60 or args.minutes <= args.warmup_minutes + 1:
        ap.error("--minutes must exceed the warm-up by more than a minute, and be at most 60")
    loadavg, version = os.getloadavg()[0], code_version()
    log = args.out.with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(args, log)
    try:
        result = asyncio.run(soak(args, server.port, server.pid))
    finally:
        code, stop_s, _ = server.stop(signal.SIGINT, 60)
    lines = log.read_text().splitlines()
    log.unlink()
    result.update(
        {
            "command": shlex.join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
            "server_command": shlex.join(["dreamr", *server.command[server.command.index("serve") :]]),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "loadavg_before": loadavg,
            "code": version,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "server_exit": {"code": code, "stop_s": stop_s},
            "server_log": {
                "lines": len(lines),
                "tracebacks": sum("Traceback" in x for x in lines),
                "excerpt": lines[:40],
            },
        }
    )
    result["summary"] = summarise(result, args)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = to_markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if result["summary"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
