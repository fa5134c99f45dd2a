"""The attacks of ``abuse.py`` on a running ``dreamr serve``'s surface (``serve_process.ServeProcess``):
many large distinct uploads, idle connections from one address, formats outside the allowlist;
and the WebSocket client they and ``abuse_stall.py`` use. Each attack returns an ``Outcome``;
``abuse.py`` says what must hold.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import time
from collections import Counter
from typing import Any

import numpy as np
from abuse_outcome import Outcome, mib, timed
from PIL import Image
from serve_process import ServeProcess, http_json, idle_stats, tree_sample
from soak import TERMINAL, puzzles
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from dreamr_stream.tasks import get_task, items

FORMATS = ("EPS", "TGA", "PCX", "TIFF")  # Pillow writes each; the server must decode none
ANSWER_WITHIN_S = 600.0  # an upload not answered or refused by then is a problem of the run


# --- one client --------------------------------------------------------------------------------


async def open_client(url: str, source: str = "127.0.0.1") -> ClientConnection:
    """A connection from ``source`` (any 127.0.0.x: each is an address of its own to the server),
    past its ``hello``."""
    ws = await connect(url, compression=None, max_size=None, open_timeout=60, local_addr=(source, 0))
    hello = json.loads(await asyncio.wait_for(ws.recv(), 60))
    if hello.get("type") != "hello":
        raise RuntimeError(f"expected hello, got {hello}")
    return ws


async def send_ask(ws: ClientConnection, image_b64: str, question: str, **options: Any) -> None:
    await ws.send(json.dumps({"v": 1, "type": "ask", "image": image_b64, "question": question, "options": options}))


async def read_request(ws: ClientConnection, until: set[str] = TERMINAL) -> list[dict[str, Any]]:
    """The request's messages up to the first of type ``until`` (its terminal one by default)."""
    out: list[dict[str, Any]] = []
    while not out or out[-1]["type"] not in until:
        out.append(json.loads(await ws.recv()))
    return out


async def ask(url: str, image_b64: str, question: str, *, source: str = "127.0.0.1", **options: Any) -> dict[str, Any]:
    """One request on a connection of its own; its terminal message."""
    ws = await open_client(url, source)
    try:
        await send_ask(ws, image_b64, question, **options)
        return (await read_request(ws))[-1]
    except BaseException:  # cancelled (out of time) or failed: leave at once
        ws.transport.abort()
        raise
    finally:
        await ws.close()


def outcome_of(message: dict[str, Any] | None) -> str:
    """``stats``, ``cancelled``, ``error:<code>``, or ``no answer`` (it did not come in time)."""
    if message is None:
        return "no answer"
    return f"error:{message['code']}" if message["type"] == "error" else str(message["type"])


async def attempt(
    url: str, image_b64: str, question: str, *, limit_s: float, source: str = "127.0.0.1", **options: Any
) -> tuple[str, float]:
    """``ask``, whatever happens: how it ended (``outcome_of``, or ``refused <HTTP status>``, or the
    error that ended the connection), and its seconds."""
    t0 = time.monotonic()
    try:
        message, _ = await timed(ask(url, image_b64, question, source=source, **options), limit_s)
        return outcome_of(message), time.monotonic() - t0
    except InvalidStatus as e:
        return f"refused {e.response.status_code}", time.monotonic() - t0
    except Exception as e:  # the outcome: what a client would see
        return f"{type(e).__name__}: {e}", time.monotonic() - t0


def puzzle() -> tuple[str, str]:
    """A demo puzzle: its image (PNG, base64) and question."""
    p = puzzles(1)[0]
    return p.image_b64, p.question


# --- formats outside the allowlist -------------------------------------------------------------


async def formats(server: ServeProcess, args: argparse.Namespace) -> Outcome:
    item = next(items(get_task(), "test", 1, start=71_000))
    got = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        item.image.convert("RGB").save(buf, format=fmt)
        image = base64.b64encode(buf.getvalue()).decode()
        got[fmt], _ = await attempt(server.ws_url, image, item.question, limit_s=args.deadline_s)
    after, _ = await attempt(server.ws_url, *puzzle(), limit_s=args.deadline_s)
    problems = [f"{fmt}: {o}" for fmt, o in got.items() if o != "error:invalid_image"]
    problems += [] if after == "stats" else [f"a PNG afterwards: {after}"]
    return Outcome(
        held=not problems,
        measured=", ".join(f"{fmt} {o}" for fmt, o in got.items()) + f"; a PNG puzzle afterwards: {after}",
        numbers={"uploads": len(FORMATS), "invalid_image": sum(o == "error:invalid_image" for o in got.values())},
        problems=problems,
    )


# --- idle connections from one address ---------------------------------------------------------


async def idle_connections(server: ServeProcess, args: argparse.Namespace) -> Outcome:
    tally: Counter[str] = Counter()
    held: list[ClientConnection] = []

    async def hold() -> None:
        try:
            held.append(await open_client(server.ws_url))
            tally["accepted"] += 1
        except InvalidStatus as e:
            tally[f"refused {e.response.status_code}"] += 1
        except Exception as e:  # anything but a refusal is a problem of the run
            tally[f"{type(e).__name__}: {e}"] += 1

    try:
        await asyncio.gather(*(hold() for _ in range(args.idle_connections)))
        during = await http_json(server.port, "/stats")
        other, other_s = await attempt(server.ws_url, *puzzle(), source="127.0.0.2", limit_s=args.deadline_s)
        still_open = sum(ws.state.name == "OPEN" for ws in held)
    finally:
        await asyncio.gather(*(ws.close() for ws in held))
    after, drain_s = await idle_stats(server.port, 10)
    fresh, _ = await attempt(server.ws_url, *puzzle(), limit_s=args.deadline_s)
    unexpected = {k: v for k, v in tally.items() if k not in ("accepted", "refused 503")}
    problems = [f"{v} x {k}" for k, v in unexpected.items()]
    problems += [] if other == "stats" else [f"the client from 127.0.0.2: {other}"]
    problems += [] if fresh == "stats" else [f"a request from 127.0.0.1 afterwards: {fresh}"]
    return Outcome(
        held=not problems,
        measured=(
            f"{args.idle_connections} connections from 127.0.0.1: {tally['accepted']} held open, "
            f"{tally['refused 503']} refused (503); the client from 127.0.0.2: {other} in {other_s:.1f} s "
            f"with {still_open} idle ones still open; after they closed: {fresh}"
        ),
        numbers={
            "opened": args.idle_connections,
            "accepted": tally["accepted"],
            "refused_503": tally["refused 503"],
            "server_connections_during": during["connections"],
            "second_client_s": round(other_s, 2),
            "connections_after": after["connections"],
            "drain_s": round(drain_s, 2),
        },
        problems=problems,
    )


# --- many large distinct uploads ---------------------------------------------------------------


def noise_jpegs(n: int, side: int, quality: int, seed: int = 0) -> Any:
    """``n`` distinct ``side``-square noise JPEGs (base64): one noise field, shifted by one more
    pixel each time (distinct pixels, so distinct image digests: no cache hit among them)."""
    base = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.roll(base, (i // side + 1, i % side), axis=(0, 1))).save(buf, "JPEG", quality=quality)
        yield base64.b64encode(buf.getvalue()).decode()


class Uploads:
    """The uploads, each made when a client asks for its next one, in a worker thread (encoding is
    the clients' CPU work, off their event loop), one at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._made = noise_jpegs(args.uploads, args.side, args.quality)
        self._lock = asyncio.Lock()
        self.sizes: list[int] = []  # bytes of base64 of each

    async def next(self) -> str | None:
        async with self._lock:
            b64: str | None = await asyncio.to_thread(next, self._made, None)
        if b64 is not None:
            self.sizes.append(len(b64))
        return b64


async def _closed_as_idle(ws: ClientConnection) -> bool:
    """The server has closed the connection for asking nothing for its idle timeout (close 1000
    "idle: ..."); a close frame waiting to be read counts (cancelling ``recv`` loses nothing)."""
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 0.01)
    return ws.close_code == 1000 and (ws.close_reason or "").startswith("idle")


async def upload_client(url: str, index: int, jobs: Uploads, tally: Counter[str]) -> None:
    """Send uploads one after the other, each as soon as the last one is answered, from an
    address of its own (127.0.0.<10 + index>).

    The uploads are made one at a time for all the clients, so a client may wait longer for its
    next one than the server's idle timeout: the server then closes its connection (it asked
    nothing), and the client connects again, as any client does, before it sends."""
    question, source = puzzle()[1], f"127.0.0.{10 + index}"
    try:
        ws = await open_client(url, source)
    except Exception as e:  # a client that cannot connect is a problem of the run
        tally[f"connect failed: {type(e).__name__}: {e}"] += 1
        return
    try:
        while (b64 := await jobs.next()) is not None:
            try:
                if await _closed_as_idle(ws):
                    tally["reconnected after the idle timeout"] += 1
                    ws = await open_client(url, source)
                await send_ask(ws, b64, question)
                del b64
                async with asyncio.timeout(ANSWER_WITHIN_S):
                    tally[outcome_of((await read_request(ws))[-1])] += 1
            except Exception as e:  # the connection is gone: the rest of the uploads go to the others
                tally[f"{type(e).__name__}: {e}"] += 1
                return
    finally:
        await ws.close()


async def sample_rss(server: ServeProcess, every_s: float, stop: asyncio.Event) -> list[tuple[float, int]]:
    """(seconds, RSS of the server and its processes) every ``every_s`` until ``stop``."""
    samples, t0 = [], time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - t0, tree_sample(server.pid)["total_rss"]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return samples


def curve(samples: list[tuple[float, int]], points: int = 40) -> list[tuple[float, float]]:
    """The samples thinned to about ``points`` (seconds, MiB), each the peak of its stretch."""
    step = max(1, -(-len(samples) // points))
    return [(round(samples[i][0]), mib(max(r for _, r in samples[i : i + step]))) for i in range(0, len(samples), step)]


def hwm(pid: int) -> int:
    """The high-water marks of RSS of the server and of its processes now, summed: an upper bound
    of the tree's peak (each process may have peaked at another time)."""
    tree = tree_sample(pid)
    return int(tree["server"]["hwm"] + sum(c["hwm"] for c in tree["children"].values()))


async def uploads(server: ServeProcess, args: argparse.Namespace) -> Outcome:
    await ask(server.ws_url, *puzzle())  # warm: the idle size is a server that has answered
    await idle_stats(server.port, 10)
    await asyncio.sleep(2)
    idle = tree_sample(server.pid)["total_rss"]
    jobs = Uploads(args)
    tally: Counter[str] = Counter()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server, args.sample_s, stop))
    t0 = time.monotonic()
    await asyncio.gather(*(upload_client(server.ws_url, i, jobs, tally) for i in range(args.upload_clients)))
    sizes = jobs.sizes
    wall_s = time.monotonic() - t0
    stop.set()
    samples = await sampler
    stats, _ = await idle_stats(server.port, 30)
    await asyncio.sleep(2)
    end = tree_sample(server.pid)["total_rss"]
    peak, budget = max((r for _, r in samples), default=idle), args.rss_budget_mib * 2**20
    allowed = {"stats", "error:busy", "error:rate_limited", "reconnected after the idle timeout"}
    problems = [f"{v} x {k}" for k, v in tally.items() if k not in allowed]
    if len(sizes) != args.uploads:
        problems.append(f"{len(sizes)} of {args.uploads} uploads sent: the clients were gone")
    if peak - idle > budget:
        problems.append(f"RSS peak {mib(peak)} MiB is {mib(peak - idle)} MiB over idle: over the budget")
    return Outcome(
        held=not problems,
        measured=(
            f"{args.uploads} distinct {args.side}x{args.side} noise JPEGs ({mib(sum(sizes) / max(1, len(sizes)))} MiB "
            f"of base64 each) from {args.upload_clients} clients in {wall_s:.0f} s: {dict(tally)}; RSS (server and "
            f"draft process) idle {mib(idle)}, peak {mib(peak)} (+{mib(peak - idle)}), end {mib(end)} MiB"
        ),
        numbers={
            "uploads": args.uploads,
            "side": args.side,
            "clients": args.upload_clients,
            "wall_s": round(wall_s, 1),
            **{k.removeprefix("error:"): v for k, v in tally.items()},
            "rss_idle_mib": mib(idle),
            "rss_peak_mib": mib(peak),
            "rss_end_mib": mib(end),
            "rss_peak_over_idle_mib": mib(peak - idle),
            "rss_budget_mib": args.rss_budget_mib,
            "hwm_sum_mib": mib(hwm(server.pid)),
            "rss_samples": len(samples),
            "rss_curve_s_mib": curve(samples),
            "server_totals": stats["totals"],
        },
        problems=problems,
    )
