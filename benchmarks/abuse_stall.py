"""The attacks of ``abuse.py`` on the parts a request waits for: the server's draft process
stopped (SIGSTOP) mid-request, and a served model (OpenAI-compatible) that trickles one byte a
second. Each returns an ``Outcome``; ``abuse.py`` says what must hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from abuse_outcome import Outcome, timed
from abuse_serve import ask, open_client, outcome_of, puzzle, read_request, send_ask
from serve_process import ServeProcess, model_children
from soak import TERMINAL

from dreamr_stream.backends.breaker import CircuitBreaker
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import CacheConfig, SchedulingConfig
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks import get_task, items

# --- the draft's process stopped ---------------------------------------------------------------


class Stopped:
    """The processes this attack stopped (SIGSTOP); ``release`` kills those still there."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def stop(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.pids.append(pid)

    def alive(self) -> list[int]:
        """Those not gone (a stopped process stays until killed; a zombie is gone)."""
        out = []
        for pid in dict.fromkeys(self.pids):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if state != "Z":
                out.append(pid)
        return out

    def release(self) -> None:
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def started(url: str, image: str, question: str) -> Any:
    """A connection whose request (cache off: every step is model work) has started."""
    ws = await open_client(url)
    await send_ask(ws, image, question, cache=False)
    await read_request(ws, until={"started", *TERMINAL})
    return ws


async def stopped_mid_request(url: str, image: str, question: str, pid: int, stopped: Stopped) -> dict[str, Any]:
    """Stop the draft's process as a request starts; the request's terminal message."""
    async with await started(url, image, question) as ws:
        stopped.stop(pid)
        return (await read_request(ws))[-1]


async def draft_back(url: str, image: str, question: str, limit_s: float) -> float | None:
    """Seconds until a request used the draft again (its process replaced); None if none did
    within ``limit_s``."""
    t0 = time.monotonic()
    while (left := limit_s - (time.monotonic() - t0)) > 0:
        m, _ = await timed(ask(url, image, question, cache=False), left)
        if m is not None and m["type"] == "stats" and not m["stats"]["target_alone_reason"]:
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    return None


async def cancel_while_stopped(
    server: ServeProcess, image: str, question: str, stopped: Stopped, limit_s: float
) -> tuple[str, float]:
    """Stop the draft's process as a request starts, then cancel the request: what ended it, and
    how long after the cancel."""
    kids = model_children(server.pid)
    if not kids:
        return "no draft process to stop", 0.0
    async with await started(server.ws_url, image, question) as ws:
        stopped.stop(kids[-1])
        await asyncio.sleep(0.3)  # the request now waits on the stopped draft
        t = time.monotonic()
        await ws.send(json.dumps({"v": 1, "type": "cancel"}))
        messages, _ = await timed(read_request(ws), limit_s)
        return outcome_of(messages[-1] if messages else None), time.monotonic() - t


async def sigterm_while_stopped(
    server: ServeProcess, image: str, question: str, stopped: Stopped, wait_s: float
) -> tuple[int, float, bool, list[int]]:
    """SIGTERM with a request running on a stopped draft: (exit code, seconds, whether it exited
    by itself, the stopped processes it left)."""
    for pid in model_children(server.pid)[-1:]:
        stopped.stop(pid)
    ws = await started(server.ws_url, image, question)
    code, stop_s, by_itself = await asyncio.to_thread(server.stop, signal.SIGTERM, wait_s)
    left = stopped.alive() if by_itself else []  # else it was killed with its processes
    ws.transport.abort()
    return code, stop_s, by_itself, left


async def draft_stopped(server: ServeProcess, args: argparse.Namespace) -> Outcome:
    stopped = Stopped()
    try:
        return await _draft_stopped(server, args, stopped)
    finally:
        stopped.release()


async def _draft_stopped(server: ServeProcess, args: argparse.Namespace, stopped: Stopped) -> Outcome:
    image, question = puzzle()
    url, limit = server.ws_url, args.deadline_s
    await ask(url, image, question, cache=False)  # warm: the draft's process serves
    kids = model_children(server.pid)
    if not kids:
        return Outcome(False, "the server has no draft process", problems=["no draft process found"])
    first, first_s = await timed(stopped_mid_request(url, image, question, kids[0], stopped), limit)
    later = [await timed(ask(url, image, question, cache=False), limit) for _ in range(args.later_requests)]
    back_s = await draft_back(url, image, question, limit)
    cancel, cancel_s = await cancel_while_stopped(server, image, question, stopped, limit)
    code, stop_s, by_itself, left = await sigterm_while_stopped(server, image, question, stopped, args.stop_wait_s)
    reason = first["stats"]["target_alone_reason"] if first is not None and first["type"] == "stats" else None
    problems = [] if reason else [f"the request in flight: {outcome_of(first)} after {first_s:.1f} s, not alone"]
    problems += [f"a later request: {outcome_of(m)} after {s:.1f} s" for m, s in later if outcome_of(m) != "stats"]
    problems += [] if back_s is not None else [f"the draft did not serve again within {limit:g} s"]
    problems += [] if cancel == "cancelled" and cancel_s <= args.cancel_s else [f"cancel: {cancel} in {cancel_s:.1f} s"]
    if not by_itself or stop_s > args.stop_s:
        problems.append(f"SIGTERM: {'exited' if by_itself else 'still running, killed'} after {stop_s:.1f} s")
    problems += [f"stopped process {pid} left behind" for pid in left]
    later_text = ", ".join(f"{outcome_of(m)} in {s:.1f} s" for m, s in later)
    return Outcome(
        held=not problems,
        measured=(
            f"the request in flight: {outcome_of(first)} in {first_s:.1f} s ({reason or 'no target-alone reason'}); "
            f"later: {later_text}; the draft back after "
            f"{'never' if back_s is None else f'{back_s:.1f} s'}; cancel with the draft stopped: {cancel} in "
            f"{cancel_s:.1f} s; SIGTERM: exit {code} in {stop_s:.1f} s, {len(left)} stopped process(es) left"
        ),
        numbers={
            "first_s": round(first_s, 2),
            "first_target_alone_reason": reason,
            "later_s": [round(s, 2) for _, s in later],
            "draft_back_s": None if back_s is None else round(back_s, 1),
            "cancel_s": round(cancel_s, 2),
            "sigterm_exit_s": round(stop_s, 2),
            "exit_code": code,
            "left_behind": len(left),
        },
        problems=problems,
    )


# --- a served model that trickles ----------------------------------------------------------------


class TricklingServer:
    """An OpenAI-compatible server in name only, on loopback: it accepts, reads the request, and
    answers one byte a second, forever: a status line and headers, then spaces (never a whole
    line of an event, never the end of a body), never slow enough for a read timeout."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.recv(1 << 16)
            for byte in itertools.chain(self.HEAD, itertools.repeat(ord(" "))):
                if self._stop.wait(1.0):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def __enter__(self) -> Self:
        self._accepting.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self.sock.close()
        self._accepting.join()


@dataclass(frozen=True)
class DraftRuns:
    """Requests with the draft served by a stalled server: (result or None, seconds) each, the
    target alone's seconds, and whether the finished ones' steps equal the target's alone."""

    runs: list[tuple[Any, float]]
    alone_s: float
    same: bool


async def served_draft(url: str, args: argparse.Namespace) -> DraftRuns:
    """``--later-requests`` + 1 requests with the draft served by ``url``, at least as many as its
    breaker's failures in a row, then two more (the breaker open)."""
    item = next(items(get_task(), "test", 1, start=72_000))
    reasoner = Reasoner.from_pretrained(target=demo_paths().target, draft=url, device="cpu")
    reasoner.config = reasoner.config.model_copy(update={"cache": CacheConfig(enabled=False)})
    try:
        t = time.monotonic()
        alone = await reasoner.ainvoke(item.image, item.question, method="target_only")
        alone_s = time.monotonic() - t
        runs = []
        for _ in range(max(args.later_requests + 1, CircuitBreaker().failures) + 2):
            runs.append(await timed(reasoner.ainvoke(item.image, item.question), args.deadline_s))
            if runs[-1][0] is None:
                break  # no deadline: the next one would wait as long
        same = all([s.text for s in r.steps] == [s.text for s in alone.steps] for r, _ in runs if r is not None)
        return DraftRuns(runs, alone_s, same)
    finally:
        reasoner.close()


def draft_side_problems(drafts: DraftRuns, limit_s: float) -> list[str]:
    """What did not hold with the draft served by the stalled server: each request within the
    draft's deadline plus the target's own time (and 2 s), those after the breaker opened within
    the target's own time (and 2 s), all with the target alone."""
    few_s = SchedulingConfig().draft_deadline_s or limit_s
    problems = [f"a request with the draft served: no answer within {limit_s:g} s" for r, _ in drafts.runs if r is None]
    problems += [] if drafts.same else ["steps differ from the target's alone"]
    for r, s in drafts.runs:
        if r is None:
            continue
        why = r.stats.target_alone_reason
        if not why:
            problems.append(f"with the draft served: not with the target alone after {s:.1f} s")
        elif "unavailable since" in why and s > drafts.alone_s + 2.0:
            problems.append(f"with the draft's breaker open: {s:.1f} s (the target alone: {drafts.alone_s:.1f} s)")
        elif s > few_s + drafts.alone_s + 2.0:
            problems.append(f"with the draft served: {s:.1f} s, over its {few_s:g} s and the target's own time")
    return problems


async def served_target(url: str, args: argparse.Namespace) -> list[tuple[str, float]]:
    """Requests with the target served by ``url``: (what each raised, or how it ended; seconds)."""
    item = next(items(get_task(), "test", 1, start=72_000))
    paths = demo_paths()
    reasoner = Reasoner.from_pretrained(
        target=url, draft=paths.draft, device="cpu", draft_process=False, settings_from=paths.target
    )
    runs: list[tuple[str, float]] = []
    try:
        for _ in range(args.later_requests + 1):
            t = time.monotonic()
            try:
                result, _ = await timed(reasoner.ainvoke(item.image, item.question), args.deadline_s)
                runs.append(("no answer" if result is None else f"answered {result.answer!r}", time.monotonic() - t))
            except Exception as e:  # the outcome wanted: a clear error
                runs.append((f"{type(e).__name__}: {e}", time.monotonic() - t))
            if runs[-1][0] == "no answer":
                break
        return runs
    finally:
        reasoner.close()


async def trickling_server(args: argparse.Namespace) -> Outcome:
    with TricklingServer() as fake:
        drafts = await served_draft(fake.url, args)
        targets = await served_target(fake.url, args)
        connections = fake.connections
    limit = args.deadline_s
    problems = draft_side_problems(drafts, limit)
    problems += [f"with the target served: {what} after {s:.1f} s" for what, s in targets if fake.url not in what]
    draft_text = ", ".join(
        f"no answer within {s:.0f} s" if r is None else f"answered in {s:.1f} s ({r.stats.target_alone_reason})"
        for r, s in drafts.runs
    )
    return Outcome(
        held=not problems,
        measured=(
            f"draft served by the trickling server (the target alone: {drafts.alone_s:.1f} s): {draft_text}; "
            f"target served by it: " + "; ".join(f"{what[:160]} after {s:.1f} s" for what, s in targets)
        ),
        numbers={
            "deadline_s": limit,
            "draft_deadline_s": SchedulingConfig().draft_deadline_s,
            "target_alone_s": round(drafts.alone_s, 2),
            "draft_served_s": [round(s, 2) for _, s in drafts.runs],
            "target_served_s": [round(s, 2) for _, s in targets],
            "steps_equal_target_alone": drafts.same,
            "connections_to_the_trickling_server": connections,
        },
        problems=problems,
    )
