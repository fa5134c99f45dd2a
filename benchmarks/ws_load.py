"""Load test for ``dreamr serve``: concurrent WebSocket clients on the demo models, then a disconnect storm.

    python benchmarks/ws_load.py [--clients 32] [--requests 4] [--puzzles 16] [--storm 32]
                                 [--out benchmarks/results/ws_load.md]

1. References: each distinct puzzle once through ``Reasoner.ainvoke`` (serial, no cache): the
   answers every WebSocket answer must equal (greedy runs are deterministic, and concurrent
   requests equal each run alone), and the single-request latency without contention.
2. Load: ``--clients`` clients connect at once, each sends ``--requests`` requests one after
   the other (cache off, so every request does full model work). Must hold: zero errors, every
   answer equals its reference. Reported: p50/p95 of time to first verified step and of total
   time, both as the client sees them (queueing included), throughput, peak server state.
3. Storm: ``--storm`` clients connect, send, and vanish mid-stream (half close, half abort the
   TCP connection, some before the first event). Must hold: ``/stats`` shows no request, no
   queued request and no model call within a few seconds; a fresh request still works.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamr_websocket.protocol import ServerStats
from dreamr_websocket.server import DreamrServer
from dreamr_websocket.settings import ServerSettings
from websockets.asyncio.client import ClientConnection, connect

from dreamr_stream.config import CacheConfig
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks import get_task, items

STEP_TYPES = {"verified", "fallback"}
TERMINAL = {"stats", "error", "cancelled"}


@dataclass
class Puzzle:
    image_b64: str
    question: str
    known: str
    reference: str | None = None
    serial_s: float = 0.0


@dataclass
class Run:
    ttfs: list[float] = field(default_factory=list)
    ttfs_admitted: list[float] = field(default_factory=list)  # time to first step minus the queue wait
    total: list[float] = field(default_factory=list)
    queue_wait: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    correct_vs_known: int = 0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def puzzles(n: int) -> list[Puzzle]:
    out = []
    for item in items(get_task(), "test", n, start=50_000):
        buf = io.BytesIO()
        item.image.save(buf, format="PNG")
        out.append(Puzzle(base64.b64encode(buf.getvalue()).decode(), item.question, str(item.answer)))
    return out


async def http_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def stats(port: int) -> ServerStats:
    return ServerStats.model_validate(await http_json(port, "/stats"))


async def one_request(ws: ClientConnection, puzzle: Puzzle, rid: str, run: Run) -> None:
    message = {"v": 1, "type": "ask", "id": rid, "image": puzzle.image_b64, "question": puzzle.question}
    message["options"] = {"cache": False, "drafts": False}
    t0 = time.perf_counter()
    await ws.send(json.dumps(message))
    first: float | None = None
    answer: str | None = None
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 600))
        if m["type"] in STEP_TYPES and first is None:
            first = time.perf_counter() - t0
        elif m["type"] == "answer":
            answer = m["answer"]
        if m["type"] in TERMINAL:
            break
    if m["type"] != "stats":
        run.errors.append(f"{rid}: {m['type']} {m.get('code')} {m.get('message')}")
        return
    run.total.append(time.perf_counter() - t0)
    run.ttfs.append(first if first is not None else run.total[-1])
    run.queue_wait.append(m["queue_wait_s"])
    run.ttfs_admitted.append(max(0.0, run.ttfs[-1] - m["queue_wait_s"]))
    if answer != puzzle.reference:
        run.wrong.append(f"{rid}: got {answer!r}, ainvoke gave {puzzle.reference!r}")
    run.correct_vs_known += answer == puzzle.known


async def client(url: str, index: int, n_requests: int, bank: list[Puzzle], run: Run) -> None:
    try:
        async with connect(url, compression=None, max_size=None, open_timeout=60) as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            for j in range(n_requests):
                k = index * n_requests + j
                await one_request(ws, bank[k % len(bank)], f"c{index}-{j}", run)
    except Exception as e:  # a client that fails is an error of the run, not a crash of the benchmark
        run.errors.append(f"client {index}: {type(e).__name__}: {e}")


async def storm_client(url: str, index: int, bank: list[Puzzle]) -> str:
    """Connect, send, leave mid-stream; returns when it left."""
    puzzle = bank[index % len(bank)]
    ws = await connect(url, compression=None, max_size=None, open_timeout=60)
    await ws.recv()  # hello
    msg = {"v": 1, "type": "ask", "image": puzzle.image_b64, "question": puzzle.question, "options": {"cache": False}}
    await ws.send(json.dumps(msg))
    # a quarter leave at once, a quarter once the request started, half at its first step event
    # (model calls are in flight then)
    wait_for = {0: (), 1: ("started",)}.get(index % 4, ("drafted", *STEP_TYPES))
    while wait_for and json.loads(await asyncio.wait_for(ws.recv(), 600))["type"] not in wait_for:
        pass
    if index % 2:
        ws.transport.abort()
        return "abort"
    await ws.close()
    return "close"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]  # other processes on the machine skew the latencies
    t0 = time.perf_counter()
    reasoner = Reasoner.demo(target_url=args.target_url)
    load_s = time.perf_counter() - t0
    bank = puzzles(args.puzzles)
    no_cache = reasoner.config.model_copy(update={"cache": CacheConfig(enabled=False)})
    for p in bank:
        t = time.perf_counter()
        result = await reasoner.ainvoke(base64.b64decode(p.image_b64), p.question, config=no_cache)
        p.serial_s, p.reference = time.perf_counter() - t, result.answer
    serial = statistics.median(p.serial_s for p in bank)
    print(f"models {load_s:.1f}s; {len(bank)} references, serial median {serial:.2f}s")

    settings = ServerSettings(
        port=0,
        max_active=args.max_active,
        max_waiting=args.max_waiting,
        send_timeout_s=30,
        # every client is on this machine's loopback address: lift what one address may take
        max_connections_per_address=args.clients + args.storm + 2,
        requests_per_minute=None,
    )
    async with DreamrServer(reasoner, settings) as server:
        url, port = server.ws_url, server.port
        run, peak = Run(), {"active_requests": 0, "queued": 0, "in_flight": 0, "connections": 0}
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                s = await stats(port)
                for k in peak:
                    peak[k] = max(peak[k], getattr(s, k))
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        t = time.perf_counter()
        await asyncio.gather(*(client(url, i, args.requests, bank, run) for i in range(args.clients)))
        load_wall = time.perf_counter() - t
        done.set()
        await watcher
        print(f"load: {len(run.total)} ok, {len(run.errors)} errors, {len(run.wrong)} wrong in {load_wall:.1f}s")

        t = time.perf_counter()
        kinds = await asyncio.gather(*(storm_client(url, i, bank) for i in range(args.storm)))
        left_s = time.perf_counter() - t
        t = time.perf_counter()
        while True:
            s = await stats(port)
            if s.active_requests == s.queued == s.engine_requests == s.in_flight == 0:
                break
            if time.perf_counter() - t > 10:
                break
            await asyncio.sleep(0.02)
        drain_s = time.perf_counter() - t
        after_storm = s
        sanity = Run()
        async with connect(url, compression=None, max_size=None) as ws:
            await ws.recv()
            await one_request(ws, bank[0], "after-storm", sanity)
        final = await stats(port)

    n = len(run.total)
    return {
        "args": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "model_load_s": load_s,
        "serial_median_s": statistics.median(p.serial_s for p in bank),
        "requests": args.clients * args.requests,
        "ok": n,
        "errors": run.errors,
        "wrong": run.wrong,
        "correct_vs_known": run.correct_vs_known,
        "load_wall_s": load_wall,
        "throughput_rps": n / load_wall if load_wall else 0.0,
        "ttfs": {"p50": pct(run.ttfs, 50), "p95": pct(run.ttfs, 95)} if n else {},
        "total": {"p50": pct(run.total, 50), "p95": pct(run.total, 95)} if n else {},
        "queue_wait": {"p50": pct(run.queue_wait, 50), "p95": pct(run.queue_wait, 95)} if n else {},
        "ttfs_admitted": {"p50": pct(run.ttfs_admitted, 50), "p95": pct(run.ttfs_admitted, 95)} if n else {},
        "loadavg_before": load_before,
        "peak": peak,
        "storm": {
            "clients": args.storm,
            "aborted": kinds.count("abort"),
            "closed": kinds.count("close"),
            "left_s": left_s,
            "drain_s": drain_s,
            "after": after_storm.model_dump(exclude={"totals", "v"}),
            "sanity_ok": not sanity.errors and not sanity.wrong and len(sanity.total) == 1,
        },
        "totals": final.totals,
    }


def to_markdown(r: dict[str, Any]) -> str:
    a, st = r["args"], r["storm"]
    ok = not r["errors"] and not r["wrong"] and r["ok"] == r["requests"]
    drained = all(
        v == 0 for k, v in st["after"].items() if k in ("active_requests", "queued", "engine_requests", "in_flight")
    )
    lines = [
        "# `dreamr serve` under load (demo models, loopback"
        + (", the target served by vLLM)" if a.get("target_url") else ")"),
        "",
        f"`python benchmarks/ws_load.py --clients {a['clients']} --requests {a['requests']} --puzzles {a['puzzles']} "
        f"--storm {a['storm']} --max-active {a['max_active']}"
        f"{' --target-url ' + a['target_url'] if a.get('target_url') else ''}` on {r['machine']}; models loaded in "
        f"{r['model_load_s']:.1f} s; 1-minute load average before the run {r['loadavg_before']:.2f}"
        f"{' (another process was using the CPUs: latencies are pessimistic)' if r['loadavg_before'] > 0.5 else ''}. "
        "Every request runs with the trajectory cache off (full model work).",
        "",
        "## Load",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| requests | {r['requests']} ({a['clients']} clients x {a['requests']}, {a['puzzles']} distinct puzzles) |",
        f"| completed / errors | {r['ok']} / {len(r['errors'])} |",
        f"| answers equal to `Reasoner.ainvoke` | {r['ok'] - len(r['wrong'])} / {r['ok']} |",
        f"| answers equal to the puzzle's known answer (model accuracy, for information) | "
        f"{r['correct_vs_known']} / {r['ok']} |",
        f"| single request alone (serial median) | {r['serial_median_s']:.2f} s |",
        f"| time to first verified step, p50 / p95 | {r['ttfs']['p50']:.2f} s / {r['ttfs']['p95']:.2f} s |",
        f"| total time per request, p50 / p95 | {r['total']['p50']:.2f} s / {r['total']['p95']:.2f} s |",
        f"| of which waiting in the queue, p50 / p95 | {r['queue_wait']['p50']:.2f} s / "
        f"{r['queue_wait']['p95']:.2f} s |",
        f"| time to first step once out of the queue, p50 / p95 | {r['ttfs_admitted']['p50']:.2f} s / "
        f"{r['ttfs_admitted']['p95']:.2f} s |",
        f"| wall time / throughput | {r['load_wall_s']:.1f} s / {r['throughput_rps']:.2f} requests/s |",
        f"| peak active / queued / in-flight model calls / connections | {r['peak']['active_requests']} / "
        f"{r['peak']['queued']} / {r['peak']['in_flight']} / {r['peak']['connections']} |",
        "",
        "Times are measured by the clients (send to first `verified`/`fallback`, send to `stats`), so they",
        f"include queueing: {a['clients']} clients share {a['max_active']} slots over one target and one draft model.",
        "",
        "## Disconnect storm",
        "",
        f"{st['clients']} clients connect, send a request and leave ({st['aborted']} abort the TCP connection, "
        f"{st['closed']} close; a quarter leave at once, a quarter once started, half at their first step "
        f"event, with model calls in flight). All left within {st['left_s']:.2f} s.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| time until `/stats` shows no request, queue or model call | {st['drain_s']:.2f} s |",
        f"| `/stats` then | {json.dumps(st['after'])} |",
        f"| a fresh request afterwards | {'answered correctly' if st['sanity_ok'] else 'FAILED'} |",
        "",
        f"Server totals: `{json.dumps(r['totals'])}`",
        "",
        f"**Verdict: {'PASS' if ok and drained and st['sanity_ok'] else 'FAIL'}** (zero errors, every answer equal "
        "to `ainvoke`, no request work left after the storm).",
    ]
    if r["errors"] or r["wrong"]:
        lines += ["", "Problems:", "", *[f"- {e}" for e in (r["errors"] + r["wrong"])[:20]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--puzzles", type=int, default=16)
    ap.add_argument("--storm", type=int, default=32)
    ap.add_argument("--max-active", type=int, default=4)
    ap.add_argument("--max-waiting", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ws_load.md"))
    ap.add_argument("--target-url", help="the demo target served by vLLM (python -m dreamr_vllm)")
    arguments = ap.parse_args()
    result = asyncio.run(main(arguments))
    arguments.out.write_text(to_markdown(result))
    arguments.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(to_markdown(result))
    sys.exit(0 if not result["errors"] and not result["wrong"] else 1)
