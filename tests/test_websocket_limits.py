"""What one client may take of the server: connections per address, requests a minute, time
connected without asking, bytes of images held, and the event loop's time to parse its messages.

Each limit is set small here so that one test can reach it; a second client (another loopback
address: Linux routes all of 127.0.0.0/8 to lo) shows that the rest are still served.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
from dreamr_websocket import session as session_module
from dreamr_websocket.admission import RateLimited, RequestRate
from dreamr_websocket.protocol import ClientMessage, CloseCode, ErrorMessage
from dreamr_websocket.settings import ServerSettings
from PIL import Image
from websockets.asyncio.client import unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from ws_support import ask, client, idle, make_reasoner, png_b64, recv, serving, until_terminal, wait_until

from dreamr_app.cli import build_parser
from dreamr_app.serve import settings_from_args

OTHER = ("127.0.0.2", 0)  # a second client address, bound as the source of its socket


async def served_from(server: Any, local_addr: tuple[str, int] = OTHER) -> None:
    """A client from ``local_addr`` gets a full answer."""
    async with client(server, local_addr=local_addr) as ws:
        await ws.send(ask(id="other"))
        assert (await until_terminal(ws))[-1]["type"] == "stats"


@pytest.mark.asyncio
async def test_one_address_cannot_take_every_connection() -> None:
    async with serving(make_reasoner(), max_connections_per_address=4) as server:
        async with AsyncExitStack() as held:
            refused = []
            for _ in range(20):  # idle connections, all from 127.0.0.1
                try:
                    await held.enter_async_context(client(server))
                except InvalidStatus as e:
                    refused.append(e.response)
            assert len(refused) == 16 and server.stats().connections == 4
            assert all(r.status_code == 503 and b"from this address" in r.body for r in refused)
            await served_from(server)  # another address is served meanwhile
        await wait_until(lambda: server.stats().connections == 0, what="connections closed")
        await served_from(server, ("127.0.0.1", 0))  # and the first one again, once it holds fewer


@pytest.mark.asyncio
async def test_a_connection_that_asks_nothing_is_closed_despite_pings() -> None:
    reasoner = make_reasoner(delay=0.06)  # a request of about 0.6 s
    async with serving(reasoner, idle_timeout_s=0.4, ping_interval_s=0.05) as server:
        async with client(server, ping_interval=0.05) as ws:
            t0 = time.monotonic()
            await ws.send(json.dumps({"v": 1, "type": "cancel"}))  # not a request: the clock runs on
            with pytest.raises(ConnectionClosed):
                while True:
                    await recv(ws, within_s=5)
            waited_s = time.monotonic() - t0
            assert ws.close_code == CloseCode.NORMAL and "idle" in (ws.close_reason or "")
            assert 0.35 <= waited_s < 3.0 and ws.latency > 0  # closed on time, though pings were answered
        async with client(server) as ws:  # a request longer than the timeout is not cut short
            t0 = time.monotonic()
            await ws.send(ask(id="slow"))
            assert (await until_terminal(ws))[-1]["type"] == "stats"
            assert time.monotonic() - t0 > 0.4, "the request should outlast the idle timeout"
            await ws.send(ask(id="again"))  # and the connection may ask again right after it
            assert (await until_terminal(ws))[-1]["type"] == "stats"
            await asyncio.wait_for(ws.wait_closed(), 3)  # then, idle, it is closed
        assert server.totals["idle_timeouts"] == 2
    assert idle(reasoner)


@pytest.mark.asyncio
async def test_held_image_bytes_make_a_request_busy() -> None:
    big = png_b64(400)  # a few hundred bytes of PNG, 640,000 bytes decoded
    reasoner = make_reasoner(delay=0.03)
    async with serving(reasoner, max_held_image_bytes=2**20) as server:
        async with client(server) as a, client(server) as b, client(server) as c:
            await a.send(ask(id="a", image=big))
            assert (await recv(a))["type"] == "started"
            assert server.admission.image_bytes == 400 * 400 * 4
            await b.send(ask(id="b", image=big))
            busy = await recv(b)
            assert busy["code"] == "busy" and busy["retryable"] and "MiB of images" in busy["message"]
            await c.send(ask(id="c"))  # a small image still fits beside the big one
            assert (await until_terminal(c))[-1]["type"] == "stats"
            assert (await until_terminal(a))[-1]["type"] == "stats"
            await b.send(ask(id="b2", image=big))  # once the big one is done there is room
            assert (await until_terminal(b))[-1]["type"] == "stats"
        assert server.totals["busy"] == 1 and server.admission.image_bytes == 0


@pytest.mark.asyncio
async def test_a_large_message_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    parsed_on_loop: list[tuple[int, bool]] = []
    parse = session_module.parse_client_message

    def spy(raw: str) -> ClientMessage | ErrorMessage:
        parsed_on_loop.append((len(raw), threading.get_ident() == loop_thread))
        return parse(raw)

    monkeypatch.setattr(session_module, "parse_client_message", spy)
    buf = io.BytesIO()
    Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3)).save(buf, format="PNG")
    large = ask(id="large", image=base64.b64encode(buf.getvalue()).decode())
    assert len(large) > ServerSettings().parse_in_thread_bytes
    async with serving(make_reasoner()) as server, client(server) as ws:
        for message in (ask(id="small"), large):
            await ws.send(message)
            assert (await until_terminal(ws))[-1]["type"] == "stats"
    assert parsed_on_loop == [(len(ask(id="small")), True), (len(large), False)]


@pytest.mark.asyncio
async def test_one_address_asking_too_often_is_rate_limited() -> None:
    async with serving(make_reasoner(), requests_per_minute=2) as server:
        async with client(server) as ws:
            for rid in ("r1", "r2"):  # a burst of up to a minute's worth goes through
                await ws.send(ask(id=rid))
                assert (await until_terminal(ws))[-1]["type"] == "stats"
            await ws.send(ask(id="r3"))
            limited = await recv(ws)
            assert limited["id"] == "r3" and limited["code"] == "rate_limited" and limited["retryable"]
            assert "at most 2 a minute" in limited["message"] and "retry in" in limited["message"]
        await served_from(server)  # another address has its own bucket
        assert server.totals["rate_limited"] == 1


def test_the_bucket_refills_at_its_rate_and_forgets_full_buckets() -> None:
    now = [0.0]
    rate = RequestRate(6, clock=lambda: now[0])  # one every 10 s, bursts of 6
    for _ in range(6):
        rate.take("a")
    with pytest.raises(RateLimited) as info:
        rate.take("a")
    assert info.value.retry_after_s == pytest.approx(10.0)
    rate.take("b")  # another address
    now[0] = 10.0
    rate.take("a")
    with pytest.raises(RateLimited):
        rate.take("a")
    rate.PRUNE_AT = 2
    now[0] = 100.0  # every bucket full again: forgotten when a new address comes
    assert len(rate) == 2
    rate.take("c")
    assert len(rate) == 1


def test_the_limits_have_flags_with_the_settings_defaults() -> None:
    defaults = settings_from_args(build_parser().parse_args(["serve"]))
    assert defaults == ServerSettings()
    args = build_parser().parse_args(
        ["serve", "--max-connections-per-address", "2", "--max-held-image-bytes", "1000", "--requests-per-minute",
         "0", "--idle-timeout", "0", "--parse-in-thread-bytes", "10"]
    )  # fmt: skip
    s = settings_from_args(args)
    assert (s.max_connections_per_address, s.max_held_image_bytes, s.parse_in_thread_bytes) == (2, 1000, 10)
    assert s.requests_per_minute is None and s.idle_timeout_s is None  # 0: no limit


@pytest.mark.asyncio
async def test_no_limit_per_address_on_a_unix_socket(tmp_path: Any) -> None:
    """Only its owner can reach a unix socket (the resident daemon's): one 'address' for all."""
    path = str(tmp_path / "s.sock")
    async with serving(make_reasoner(), unix_path=path, max_connections_per_address=1, requests_per_minute=1) as server:
        async with AsyncExitStack() as held:
            for _ in range(3):
                ws = await held.enter_async_context(unix_connect(path, uri="ws://localhost/ws"))
                assert json.loads(await ws.recv())["type"] == "hello"
                await ws.send(ask())
                assert (await until_terminal(ws))[-1]["type"] == "stats"
            await wait_until(lambda: server.stats().connections == 3, what="three open")


async def _closed_within(reader: asyncio.StreamReader, within_s: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within_s) == b""
    except ConnectionResetError:
        return True  # dropped without a goodbye: closed all the same


@pytest.mark.asyncio
async def test_a_connection_that_never_finishes_its_request_head_is_dropped() -> None:
    async with serving(make_reasoner(), head_timeout_s=0.5) as server:
        silent = await asyncio.open_connection("127.0.0.1", server.port)
        slow = await asyncio.open_connection("127.0.0.1", server.port)
        slow[1].write(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head never ended (slowloris)
        async with client(server) as ws:  # a WebSocket outlives the deadline: its head came at once
            t0 = time.monotonic()
            assert await _closed_within(silent[0], 5.0) and await _closed_within(slow[0], 5.0)
            assert time.monotonic() - t0 < 3.0
            await asyncio.sleep(0.6)
            await ws.send(ask(id="after"))
            assert (await until_terminal(ws))[-1]["type"] == "stats"
        for _, writer in (silent, slow):
            writer.close()
