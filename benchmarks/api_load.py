"""The OpenAI-compatible endpoint under load, beside ``/ws`` on the same server, the same hour.

    python benchmarks/api_load.py [--clients 32] [--requests 4] [--puzzles 16] [--rounds 2]
                                  [--out benchmarks/results/api_load.md]

1. References: each distinct puzzle once through ``Reasoner.ainvoke`` (serial, no cache): the
   answers every answer over either path must equal.
2. Rounds, interleaved on one ``dreamr serve`` started as a user starts it, in its own process
   (one Reasoner, one admission): ``/ws`` then ``/v1/chat/completions``, ``--rounds`` times, each
   ``--clients`` clients x ``--requests`` requests one after the other (cache off, so every
   request does full model work). The clients run in this process, not the server's, as clients
   do: the API's are the ``openai`` SDK's ``AsyncOpenAI`` streaming loop, what an application
   runs; the WebSocket's are ``ws_load.py``'s. Must hold: zero errors, every answer equal to its
   reference, and the API's requests/s within 10% of the WebSocket's (median over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI
from serve_process import ServeProcess, code_version, http_json, start_server
from ws_load import Puzzle, Run, client, pct, puzzles

from dreamr_stream.config import CacheConfig
from dreamr_stream.reasoner import Reasoner


async def api_request(openai: AsyncOpenAI, model: str, puzzle: Puzzle, rid: str, run: Run) -> None:
    """One streamed completion, as an application reads it: reasoning deltas, then the content."""
    t0 = time.perf_counter()
    first: float | None = None
    content: list[str] = []
    finish: str | None = None
    stream = await openai.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{puzzle.image_b64}"}},
                    {"type": "text", "text": puzzle.question},
                ],
            }
        ],
        stream=True,
        extra_body={"cache": False},
    )
    async with stream:
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            delta = choice.delta
            if first is None and (delta.model_extra or {}).get("reasoning"):
                first = time.perf_counter() - t0
            if delta.content:
                content.append(delta.content)
            finish = choice.finish_reason or finish
    run.total.append(time.perf_counter() - t0)
    run.ttfs.append(first if first is not None else run.total[-1])
    answer = "".join(content)  # the answer itself, as ainvoke gives it
    if finish != "stop" or answer != puzzle.reference:
        run.wrong.append(f"{rid}: got {answer!r} ({finish}), ainvoke gave {puzzle.reference!r}")
    run.correct_vs_known += answer == puzzle.known


async def api_client(base_url: str, model: str, index: int, n_requests: int, bank: list[Puzzle], run: Run) -> None:
    try:
        async with AsyncOpenAI(base_url=base_url, api_key="none", timeout=600, max_retries=0) as openai:
            for j in range(n_requests):
                k = index * n_requests + j
                await api_request(openai, model, bank[k % len(bank)], f"c{index}-{j}", run)
    except Exception as e:  # a client that fails is an error of the run, not a crash of the benchmark
        run.errors.append(f"client {index}: {type(e).__name__}: {e}")


async def one_round(path: str, server: ServeProcess, args: argparse.Namespace, bank: list[Puzzle]) -> dict[str, Any]:
    run = Run()
    t = time.perf_counter()
    if path == "ws":
        await asyncio.gather(*(client(server.ws_url, i, args.requests, bank, run) for i in range(args.clients)))
    else:
        base_url = f"http://127.0.0.1:{server.port}/v1"
        model = (await http_json(server.port, "/v1/models"))["data"][0]["id"]
        clients = (api_client(base_url, model, i, args.requests, bank, run) for i in range(args.clients))
        await asyncio.gather(*clients)
    wall = time.perf_counter() - t
    n = len(run.total)
    print(f"{path}: {n} ok, {len(run.errors)} errors, {len(run.wrong)} wrong in {wall:.1f}s ({n / wall:.2f} req/s)")
    return {
        "path": path,
        "ok": n,
        "errors": run.errors,
        "wrong": run.wrong,
        "correct_vs_known": run.correct_vs_known,
        "wall_s": wall,
        "rps": n / wall if wall else 0.0,
        "ttfs_p50": pct(run.ttfs, 50) if n else None,
        "total_p50": pct(run.total, 50) if n else None,
        "total_p95": pct(run.total, 95) if n else None,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    code = code_version()  # what the server starts with (the checkout may change while it runs)
    reasoner = Reasoner.demo(target_url=args.target_url)
    bank = puzzles(args.puzzles)
    no_cache = reasoner.config.model_copy(update={"cache": CacheConfig(enabled=False)})
    for p in bank:
        result = await reasoner.ainvoke(base64.b64decode(p.image_b64), p.question, config=no_cache)
        p.reference = result.answer
    del reasoner  # the references are taken; the server loads its own models
    flags = ["--max-active", str(args.max_active), "--max-waiting", str(args.max_waiting), "--send-timeout", "30"]
    # every client is on this machine's loopback address: lift what one address may hold and ask
    flags += ["--max-connections-per-address", str(args.clients + 2), "--requests-per-minute", "0"]
    flags += ["--target-url", args.target_url] if args.target_url else []
    server = start_server(flags, Path(__file__).parent / "runs" / "api_load.server.log")
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            for path in ("ws", "api"):
                rounds.append(await one_round(path, server, args, bank))
        totals = (await http_json(server.port, "/stats"))["totals"]
    finally:
        server.stop()
    by_path = {p: [r for r in rounds if r["path"] == p] for p in ("ws", "api")}
    median_rps = {p: statistics.median(r["rps"] for r in rs) for p, rs in by_path.items()}
    return {
        "args": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "code": code,
        "loadavg_before": load_before,
        "rounds": rounds,
        "median_rps": median_rps,
        "ratio": median_rps["api"] / median_rps["ws"] if median_rps["ws"] else 0.0,
        "totals": totals,
    }


def passed(r: dict[str, Any]) -> bool:
    expected = r["args"]["clients"] * r["args"]["requests"]
    clean = all(not x["errors"] and not x["wrong"] and x["ok"] == expected for x in r["rounds"])
    return clean and r["ratio"] >= 0.9


def to_markdown(r: dict[str, Any]) -> str:
    a = r["args"]
    lines = [
        "# The OpenAI-compatible endpoint under load, beside `/ws` (demo models, loopback"
        + (", the target served by vLLM)" if a.get("target_url") else ")"),
        "",
        f"`python benchmarks/api_load.py --clients {a['clients']} --requests {a['requests']} --puzzles {a['puzzles']} "
        f"--rounds {a['rounds']} --max-active {a['max_active']}"
        f"{' --target-url ' + a['target_url'] if a.get('target_url') else ''}` on {r['machine']}, code "
        f"{r['code']}; 1-minute load average before the run {r['loadavg_before']:.2f}. One `dreamr serve` in its "
        "own process (one Reasoner, one admission); rounds interleaved `/ws`, `/v1`; trajectory cache off. The "
        "clients in another process: `/v1`, the `openai` SDK's `AsyncOpenAI` streaming loop; `/ws`, "
        "`ws_load.py`'s.",
        "",
        "| round | path | completed / errors / wrong | wall | requests/s | first step p50 | total p50 / p95 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, x in enumerate(r["rounds"]):
        lines.append(
            f"| {i // 2 + 1} | `{'/ws' if x['path'] == 'ws' else '/v1/chat/completions'}` | {x['ok']} / "
            f"{len(x['errors'])} / {len(x['wrong'])} | {x['wall_s']:.1f} s | {x['rps']:.2f} | "
            f"{x['ttfs_p50'] or 0:.2f} s | {x['total_p50'] or 0:.2f} s / {x['total_p95'] or 0:.2f} s |"
        )
    lines += [
        "",
        f"Median requests/s: `/ws` {r['median_rps']['ws']:.2f}, `/v1` {r['median_rps']['api']:.2f}: "
        f"the API at **{r['ratio']:.2f}x** the WebSocket.",
        "",
        f"Server totals: `{json.dumps(r['totals'])}`",
        "",
        f"**Verdict: {'PASS' if passed(r) else 'FAIL'}** (zero errors, every answer equal to `ainvoke`, the API's "
        "requests/s at least 0.9x the WebSocket's).",
    ]
    problems = [e for x in r["rounds"] for e in x["errors"] + x["wrong"]]
    if problems:
        lines += ["", "Problems:", "", *[f"- {e}" for e in problems[:20]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--puzzles", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-active", type=int, default=4)
    ap.add_argument("--max-waiting", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/api_load.md"))
    ap.add_argument("--target-url", help="the demo target served by vLLM (python -m dreamr_vllm)")
    arguments = ap.parse_args()
    result = asyncio.run(main(arguments))
    arguments.out.write_text(to_markdown(result))
    arguments.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(to_markdown(result))
    sys.exit(0 if passed(result) else 1)
