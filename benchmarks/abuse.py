"""Attacks on ``dreamr serve`` and on what the library stores, each with the outcome it must have.

    python benchmarks/abuse.py [--only NAME ...] [--uploads 1000] [--side 4096] [--upload-clients 80]
                               [--idle-connections 300] [--deadline-s 60] [--out benchmarks/results/abuse]

Runs every attack below, or those named by ``--only`` (repeatable), and writes the table to
``<out>.md`` and ``<out>.json``: per attack what must hold, the outcome measured, the verdict
(held / failed) and its numbers. A row of an attack not run this time is kept from the last
run (each row names its date, command and code version), so one attack can be rerun alone.

The server attacks start ``dreamr serve --port 0`` as a user does, in its own process (loopback,
the shipped demo models, the draft in a process of its own, the server's default limits):
``formats``, ``idle_connections`` and ``uploads`` share one server, ``draft_stopped`` has its
own (it stops it). Clients on loopback take source addresses of their own (127.0.0.x) where
an attack needs several clients; the server's per-address limits are its defaults.

1. ``uploads``: ``--uploads`` distinct ``--side``-square noise JPEGs (quality ``--quality``: a
   4096 px one is 3.3 MB, 4.4 MB of base64, under the 8 MiB message limit) sent over ``/ws`` by
   ``--upload-clients`` clients, each from an address of its own, each sending its next upload
   as soon as the last is answered. Must hold: every upload answered (``stats``) or refused with
   ``busy`` or ``rate_limited``, no other error; the RSS of the server and its draft process,
   sampled every ``--sample-s``, never more than ``--rss-budget-mib`` (1.5 GiB) over its idle
   size (measured after one request). Reported: idle, peak and end RSS, and the sum of the
   processes' RSS high-water marks (an upper bound of the peak between samples).
2. ``idle_connections``: ``--idle-connections`` connections from 127.0.0.1 that ask nothing,
   then a client from 127.0.0.2. Must hold: the second client's request answered while they are
   open, only ``503`` refusals among them, a request from 127.0.0.1 answered after they close.
3. ``formats``: a puzzle image as EPS, TGA, PCX and TIFF (Pillow writes each). Must hold: each
   gets ``invalid_image`` (nothing decoded, no Ghostscript run), a PNG puzzle answered after.
4. ``poisoned_cache``: in process (``dreamr serve`` has no Redis flag): a ``Reasoner`` on the
   shipped models with a ``RedisTrajectoryStore`` on a ``redis-server`` of the run's own (unix
   socket). The request's key gets, in turn: a value for another question, for another image
   digest, of 10,000 steps, with a 1 MB step, each ending "Answer: 999"; with ``trust`` off and
   on. Must hold: every request's steps equal the uncached ones, none a cache hit; the honest
   value, put back, is a hit (the poisons were under the key a request reads).
5. ``draft_stopped``: SIGSTOP the server's draft process (a child of the server in ``/proc``) as
   a request starts; then ``--later-requests`` requests; then requests until one uses the draft
   again; then a request cancelled with the draft stopped; then SIGTERM with a request running
   on a stopped draft. Must hold: the request in flight finishes with the target alone
   (``stats.target_alone_reason``) and every later one finishes, each within ``--deadline-s``
   (the draft call's deadline, 30 s by default, plus the request's own time); the draft serves
   again (its process replaced) within ``--deadline-s``; the cancel answered at once (within
   ``--cancel-s``, 1 s: the call to the stopped process is abandoned, not awaited); the server
   exits by itself within ``--stop-s`` of SIGTERM, leaving no stopped process behind. Needs
   deadlines on the draft process's calls.
6. ``trickling_server``: a fake OpenAI-compatible server on loopback that accepts and answers
   one byte a second, forever. With the draft served by it (``Reasoner.from_pretrained(target=
   <shipped target>, draft=URL)``): each request finishes with the target alone, its steps those
   of the target alone, within a few seconds (the draft's deadline, ``draft_deadline_s``, plus
   the target's own time and 2 s), and once the draft's breaker has opened (after its failures
   in a row; two requests more are sent) without waiting on the draft at all (the target's own
   time plus 2 s); with the target served by it: each request fails with an error naming the
   server within ``--deadline-s``. Needs a total deadline per call of the served-model client, a
   draft's few seconds, and its breaker.
7. ``killed_export``: ``dreamr zoo export`` of the shipped target over a folder it exported
   before, SIGKILLed at points of its work: an export's changes under the folder's parent, as
   polling sees them, are counted on one that runs to its end, and each trial (from the same
   old folder) is killed at its change ``1 + f * (n - 1)`` for each ``f`` of ``--export-kill-at``
   (0 is its first write; past 1, it finishes first). Must hold: after each kill every file of
   the folder hashes as before, or the folder is the new export whole; the next export over the
   leftovers writes the new folder whole with nothing beside it.
8. ``vllm_stopped``: two real vLLM servers (``dreamr_vllm.VLLMServer``, in the venv
   ``--vllm-venv``, default ``$DREAMR_VLLM_VENV`` or ``.venv-vllm``, never built here; about 2
   minutes to start on 2 cores), one serving the shipped draft, one the target. For each: a
   request, then one stopped mid-way (SIGSTOP of the server's process group), then
   ``--later-requests`` while it is stopped, then SIGCONT and requests until one is served by it
   again. Must hold: with the draft's server stopped, each request finishes with the target
   alone; with the target's, each fails with an error naming the server; each within
   ``--deadline-s``; once continued, each server serves again within ``--deadline-s`` (the
   requests recover by themselves). Needs the served-model client's deadline and breaker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import abuse_data
import abuse_serve
import abuse_stall
import abuse_vllm
from abuse_outcome import Outcome
from serve_process import ServeProcess, code_version, start_server

SURFACE: dict[str, Callable[[ServeProcess, argparse.Namespace], Awaitable[Outcome]]] = {
    "formats": abuse_serve.formats,
    "idle_connections": abuse_serve.idle_connections,
    "uploads": abuse_serve.uploads,
}
LOCAL: dict[str, Callable[[argparse.Namespace], Awaitable[Outcome]]] = {
    "poisoned_cache": abuse_data.poisoned_cache,
    "trickling_server": abuse_stall.trickling_server,
    "vllm_stopped": abuse_vllm.vllm_stopped,
}
MUST_HOLD = {
    "uploads": "every upload answered or refused with busy / rate_limited, no other error; RSS (server + draft "
    "process) at most the budget over idle",
    "idle_connections": "a client from another address served while they are open; only 503 refusals; served after",
    "formats": "EPS, TGA, PCX, TIFF each get invalid_image; a PNG answered after",
    "draft_stopped": "the request in flight and later ones finish (target alone) within the deadline; the draft "
    "back; cancel answered within 1 s; SIGTERM exits within 5 s, no stopped process left",
    "poisoned_cache": "steps equal the uncached ones for every poison, trust off and on; no hit; the honest value hits",
    "trickling_server": "draft served by it: each request finishes with the target alone within a few seconds (the "
    "draft's deadline), and without waiting on it once its breaker opens; target served by it: a clear error within "
    "the deadline",
    "killed_export": "the folder byte-identical to the old one or the new one whole; the next export recovers",
    "vllm_stopped": "draft's server stopped: requests finish with the target alone within the deadline; target's "
    "server stopped: a clear error within the deadline; each served by it again once continued",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(MUST_HOLD), help="run this attack (repeatable)")
    ap.add_argument("--uploads", type=int, default=1000)
    ap.add_argument("--side", type=int, default=4096, help="uploads' side in pixels")
    ap.add_argument("--quality", type=int, default=20, help="uploads' JPEG quality")
    ap.add_argument("--upload-clients", type=int, default=80, help="each from an address of its own (at most 240)")
    ap.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling interval")
    ap.add_argument("--rss-budget-mib", type=float, default=1536.0, help="allowed RSS over idle")
    ap.add_argument("--idle-connections", type=int, default=300)
    ap.add_argument("--deadline-s", type=float, default=60.0, help="a request's deadline with a part stalled")
    ap.add_argument("--later-requests", type=int, default=2)
    ap.add_argument("--cancel-s", type=float, default=1.0, help="a cancel's deadline with the draft stopped")
    ap.add_argument("--stop-s", type=float, default=5.0, help="SIGTERM to exit")
    ap.add_argument("--stop-wait-s", type=float, default=20.0, help="how long to wait for it before killing it")
    ap.add_argument(
        "--export-kill-at",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.5],
        help="kill exports at these fractions of the changes an export makes to the folder (one each)",
    )
    ap.add_argument("--vllm-venv", type=Path, default=abuse_vllm.DEFAULT_VENV, help="vLLM's venv (never built here)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "abuse")
    args = ap.parse_args(argv)
    if not 1 <= args.upload_clients <= 240:
        ap.error("--upload-clients: 1 to 240 (one address each, 127.0.0.10 on)")
    return args


async def guarded(work: Awaitable[Outcome]) -> Outcome:
    """The attack's outcome; an attack that raised is one that failed, with its traceback."""
    try:
        return await work
    except Exception as e:  # one broken attack must not lose the others' results
        return Outcome(False, f"the attack itself failed: {type(e).__name__}: {e}", problems=[traceback.format_exc()])


def server_log(server: ServeProcess) -> dict[str, Any]:
    lines = server.log.read_text().splitlines()
    server.log.unlink()
    return {"server_log_lines": len(lines), "server_log_tracebacks": sum("Traceback" in x for x in lines)}


async def on_server(names: list[str], args: argparse.Namespace, tag: str) -> dict[str, Outcome]:
    """The attacks ``names`` in turn on one ``dreamr serve``; stopped after them (SIGINT)."""
    server = start_server([], args.out.with_suffix(f".{tag}.server.log"))
    out = {}
    try:
        for name in names:
            attack = abuse_stall.draft_stopped if name == "draft_stopped" else SURFACE[name]
            out[name] = await guarded(attack(server, args))
    finally:
        if server.proc.poll() is None:
            code, stop_s, _ = server.stop()
            for outcome in out.values():
                outcome.numbers["server_sigint_exit"] = {"code": code, "s": round(stop_s, 2)}
        log = server_log(server)
        for outcome in out.values():
            outcome.numbers.update(log)
    return out


async def killed_export(args: argparse.Namespace) -> Outcome:
    return await asyncio.to_thread(abuse_data.killed_export, args)


def run(names: list[str], args: argparse.Namespace) -> dict[str, Outcome]:
    """Every attack of ``names``, the ones sharing a server on one."""
    out: dict[str, Outcome] = {}
    if shared := [n for n in SURFACE if n in names]:
        out.update(asyncio.run(on_server(shared, args, "surface")))
    if "draft_stopped" in names:
        out.update(asyncio.run(on_server(["draft_stopped"], args, "draft")))
    for name, attack in {**LOCAL, "killed_export": killed_export}.items():
        if name in names:
            out[name] = asyncio.run(guarded(attack(args)))
    return out


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Abuse: attacks on `dreamr serve` and on what is stored, each with the outcome it must have",
        "",
        "Written by `benchmarks/abuse.py` (its docstring says what each attack does and what must hold). Each row "
        "names the run that measured it; a row from an older run was not rerun since.",
        "",
        "| attack | must hold | outcome measured | verdict | run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in MUST_HOLD:
        r = rows.get(name)
        if r is None:
            lines.append(f"| `{name}` | {cell(MUST_HOLD[name])} | not run | not run | - |")
            continue
        run_text = f"{r['date']}, code {r['code']}, {r['machine']}, load {r['loadavg_before']:.1f}: `{r['command']}`"
        lines.append(
            f"| `{name}` | {cell(r['must_hold'])} | {cell(r['measured'])} | **{r['verdict']}** | {cell(run_text)} |"
        )
    lines += ["", "## Numbers", ""]
    for name, r in ((n, rows[n]) for n in MUST_HOLD if n in rows):
        lines += [f"`{name}`: `{json.dumps(r['numbers'], default=str)}`", ""]
    problems = [(n, p) for n in MUST_HOLD if n in rows for p in rows[n]["problems"]]
    if problems:
        tail = [f"- `{n}`: {cell(p if len(p) <= 600 else '... ' + p[-600:])}" for n, p in problems]
        lines += ["## What did not hold", "", *tail]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(MUST_HOLD)
    meta = {
        "command": shlex.join(["python", "benchmarks/abuse.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg_before": os.getloadavg()[0],
    }
    path = args.out.with_suffix(".json")
    rows: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    outcomes = run(names, args)
    for name, o in outcomes.items():
        rows[name] = {"must_hold": MUST_HOLD[name], "verdict": "held" if o.held else "failed", **asdict(o), **meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    text = to_markdown(rows)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if all(o.held for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
