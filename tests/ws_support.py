"""Helpers for the WebSocket tests: scripted reasoners, a server on a free loopback port, clients."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from dreamr_websocket.protocol import ServerMessageAdapter
from dreamr_websocket.server import DreamrServer
from dreamr_websocket.settings import ServerSettings
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, SchedulingConfig
from dreamr_stream.reasoner import Reasoner

TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]
DRAFT = ["read row one", "read row 2 wrongly", "count them up", "Answer: 4"]
QUESTION = "How many red shapes are there?"
TERMINAL = {"stats", "error", "cancelled"}


def png_b64(size: int = 32, colour: tuple[int, int, int] = (200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def make_reasoner(
    *,
    delay: float = 0.0,
    target: Sequence[str] | Callable[..., Any] = TARGET,
    draft: Sequence[str] | Callable[..., Any] = DRAFT,
    fail_at_call: int | None = None,
    cache: bool = False,
    max_step_tokens: int | None = None,
) -> Reasoner:
    """A Reasoner over scripted fakes: step 2 of the draft is wrong, so one rejection + fallback."""
    from dreamr_stream.config import GenerationConfig

    config = ReasonerConfig(
        cache=CacheConfig(enabled=cache),
        scheduling=SchedulingConfig(fallback="on", fallback_chunk_tokens=1),
        generation=GenerationConfig(max_step_tokens=max_step_tokens or 96),
    )
    t = ScriptedBackend(target, name="target", token_delay_s=delay, fail_at_call=fail_at_call)
    d = ScriptedBackend(draft, name="draft", token_delay_s=delay / 4)
    return Reasoner(t, d, config=config)


def backends(reasoner: Reasoner) -> list[ScriptedBackend]:
    assert reasoner.draft is not None
    return [reasoner.target.backend, reasoner.draft.backend]  # type: ignore[list-item]


def idle(reasoner: Reasoner) -> bool:
    """No request, model call or session of any request is left."""
    return (
        reasoner.active_requests == 0
        and reasoner.in_flight == 0
        and all(b.active_calls == 0 and b.open_sessions == 0 for b in backends(reasoner))
    )


async def wait_until(predicate: Callable[[], bool], within_s: float = 3.0, what: str = "condition") -> float:
    """Seconds until ``predicate()`` held; fails the test after ``within_s``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > within_s:
            raise AssertionError(f"{what} did not hold within {within_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


@asynccontextmanager
async def serving(reasoner: Reasoner | Mapping[str, Reasoner], **settings: Any) -> AsyncIterator[DreamrServer]:
    settings.setdefault("port", 0)
    async with DreamrServer(reasoner, ServerSettings(**settings)) as server:
        yield server


@asynccontextmanager
async def client(server: DreamrServer, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    """A connected client that has already read the server's ``hello``."""
    async with connect(server.ws_url, compression=None, **kwargs) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["type"] == "hello" and hello["v"] == 1
        yield ws


def ask(question: str = QUESTION, image: str | None = None, **fields: Any) -> str:
    return json.dumps({"v": 1, "type": "ask", "image": image or png_b64(), "question": question, **fields})


async def recv(ws: ClientConnection, within_s: float = 5.0) -> dict[str, Any]:
    """One server message, validated against the protocol models."""
    raw = await asyncio.wait_for(ws.recv(), within_s)
    ServerMessageAdapter.validate_json(raw)
    message: dict[str, Any] = json.loads(raw)
    return message


async def until_terminal(ws: ClientConnection, within_s: float = 10.0) -> list[dict[str, Any]]:
    """Every message of one request, up to its terminal message (stats, error or cancelled)."""
    out: list[dict[str, Any]] = []
    while True:
        out.append(await recv(ws, within_s))
        if out[-1]["type"] in TERMINAL:
            return out


async def http_get(server: DreamrServer, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """A minimal HTTP/1.1 GET against the server (async: the server runs on this loop)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), parsed, body
