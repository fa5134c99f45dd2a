"""The WebSocket server end to end: a real websockets client against a real server on loopback.

The Reasoner runs over scripted fakes, so each request takes milliseconds; the browser test
and the load benchmark use the demo models.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from dreamr_websocket.protocol import PROTOCOL_VERSION, CloseCode, ServerStats
from dreamr_websocket.routes import DemoPuzzle
from dreamr_websocket.server import DreamrServer
from dreamr_websocket.settings import ServerSettings
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from ws_support import (
    QUESTION,
    TARGET,
    ask,
    client,
    http_get,
    idle,
    make_reasoner,
    png_b64,
    recv,
    serving,
    until_terminal,
    wait_until,
)

from dreamr_stream.events import Event
from dreamr_stream.inputs import load_image
from dreamr_stream.reasoner import Reasoner

pytestmark = pytest.mark.asyncio


async def test_stream_shows_every_kind_of_event_and_equals_ainvoke() -> None:
    reasoner = make_reasoner(delay=0.002)
    async with serving(reasoner) as server, client(server) as ws:
        await ws.send(ask(id="q1"))
        messages = await until_terminal(ws)
    types = [m["type"] for m in messages]
    assert types[0] == "started" and types[-2:] == ["answer", "stats"]
    assert {"drafted", "verified", "rejected", "fallback"} <= set(types)
    assert all(m["id"] == "q1" and m["v"] == PROTOCOL_VERSION for m in messages)
    steps = [m["step"] for m in messages if m["type"] in ("verified", "fallback")]
    assert [s["text"] for s in steps] == TARGET
    assert all(s["verdict"]["ratio"] >= s["verdict"]["tau"] for s in steps if s["source"] == "draft")
    [rejected] = [m for m in messages if m["type"] == "rejected"]
    assert rejected["verdict"]["accepted"] is False
    answer = next(m for m in messages if m["type"] == "answer")
    expected = await reasoner.ainvoke(load_image(base64.b64decode(png_b64())), QUESTION)
    assert answer["answer"] == expected.answer == "4"
    assert [s["text"] for s in answer["steps"]] == [s.text for s in expected.steps]
    assert messages[-1]["stats"]["steps_by_source"] == {"draft": 3, "target": 1}
    assert idle(reasoner)


async def test_options_reach_the_engine() -> None:
    reasoner = make_reasoner()
    async with serving(reasoner) as server, client(server) as ws:
        await ws.send(ask(options={"method": "target_only", "drafts": False, "timeline": True}))
        messages = await until_terminal(ws)
        assert {m["type"] for m in messages} == {"started", "fallback", "answer", "stats"}
        assert messages[0]["method"] == "target_only" and messages[-1]["stats"]["timeline"]
        await ws.send(ask(options={"tau": 1e6}))  # the highest tau a client may send rejects every draft here
        messages = await until_terminal(ws)
        assert [m["step"]["source"] for m in messages if m["type"] == "fallback"] == ["target"] * 4
        assert any(m["type"] == "rejected" for m in messages)


async def test_http_routes_page_puzzle_stats_schema() -> None:
    async with serving(make_reasoner()) as server:
        status, headers, body = await http_get(server, "/")
        assert status == 200 and headers["content-type"].startswith("text/html") and b"aria-live" in body
        assert "script-src 'self'" in headers["content-security-policy"]
        for path in ("/static/app.js", "/static/style.css"):
            assert (await http_get(server, path))[0] == 200
        for path in ("/static/../settings.py", "/static/index.html/..", "/etc/passwd", "/static/"):
            assert (await http_get(server, path))[0] == 404, path
        status, _, body = await http_get(server, "/puzzle?seed=7")
        puzzle = DemoPuzzle.model_validate_json(body)
        assert status == 200 and puzzle.seed == 7 and puzzle.answer.lstrip("-").isdigit()
        assert load_image(puzzle.image).size == (112, 112)
        assert (await http_get(server, "/puzzle?seed=-1"))[0] == 400
        _, _, body = await http_get(server, "/stats")
        stats = ServerStats.model_validate_json(body)
        assert status == 200 and stats.active_requests == 0 and stats.in_flight == 0
        status, _, body = await http_get(server, "/schema.json")
        assert status == 200 and json.loads(body)["version"] == PROTOCOL_VERSION


async def test_token_is_checked_at_the_handshake() -> None:
    token = "a-long-test-token"
    async with serving(make_reasoner(), token=token) as server:
        for url in (server.ws_url, server.ws_url + "?token=wrong"):
            with pytest.raises(InvalidStatus) as info:
                async with connect(url):
                    pass
            assert info.value.response.status_code == 401
        async with connect(server.ws_url + f"?token={token}") as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
        async with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
        assert (await http_get(server, "/stats"))[0] == 401
        assert (await http_get(server, "/stats", {"Authorization": f"Bearer {token}"}))[0] == 200
        assert (await http_get(server, f"/stats?token={token}"))[0] == 401  # in a URL only for the WebSocket
        assert (await http_get(server, "/"))[0] == 200  # the page itself is public; it reads #token=


async def test_origin_allowlist_and_connection_limit() -> None:
    async with serving(make_reasoner(), origins=("https://app.example",), max_connections=2) as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.ws_url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403
        own = f"http://127.0.0.1:{server.port}"
        async with client(server, origin=own), client(server, origin="https://app.example"):
            with pytest.raises(InvalidStatus) as info:
                async with connect(server.ws_url):
                    pass
            assert info.value.response.status_code == 503
        await wait_until(lambda: server.stats().connections == 0, what="connections closed")
        async with client(server):
            pass


async def test_one_request_at_a_time_and_cancel() -> None:
    reasoner = make_reasoner(delay=0.05)
    async with serving(reasoner) as server, client(server) as ws:
        await ws.send(ask(id="first"))
        assert (await recv(ws))["type"] == "started"
        await ws.send(ask(id="second"))
        while (message := await recv(ws))["type"] != "error":
            assert message["id"] == "first"
        assert message["code"] == "request_in_progress" and message["id"] == "second"
        await ws.send(json.dumps({"v": 1, "type": "cancel"}))
        while (message := await recv(ws))["type"] != "cancelled":
            assert message["id"] == "first"
        assert message["id"] == "first"
        assert idle(reasoner)  # cancel returns only after the request's work has stopped
        await ws.send(ask(id="third", options={"method": "draft_only"}))
        assert (await until_terminal(ws))[-1]["type"] == "stats"
    assert server.totals["cancelled"] == 1


async def test_bounded_queue_says_queued_then_busy() -> None:
    reasoner = make_reasoner(delay=0.03)
    async with serving(reasoner, max_active=1, max_waiting=1) as server:
        async with client(server) as a, client(server) as b, client(server) as c:
            await a.send(ask(id="a"))
            assert (await recv(a))["type"] == "started"
            await b.send(ask(id="b"))
            queued = await recv(b)
            assert queued["type"] == "queued" and queued["position"] == 1
            await wait_until(lambda: server.stats().queued == 1, what="b waiting")
            await c.send(ask(id="c"))
            busy = await recv(c)
            assert busy["type"] == "error" and busy["code"] == "busy" and busy["retryable"] is True
            assert (await until_terminal(a))[-1]["type"] == "stats"
            b_messages = await until_terminal(b)
            assert b_messages[-1]["type"] == "stats" and b_messages[-1]["queue_wait_s"] > 0
            await c.send(ask(id="c2"))  # the same connection may retry once there is room
            assert (await until_terminal(c))[-1]["type"] == "stats"
        assert server.totals["busy"] == 1 and server.totals["completed"] == 3


async def test_concurrent_clients_share_the_models() -> None:
    reasoner = make_reasoner(delay=0.001)

    async def one(server, i: int) -> list[str]:  # type: ignore[no-untyped-def]
        async with client(server) as ws:
            await ws.send(ask(id=f"c{i}"))
            messages = await until_terminal(ws, within_s=20)
        assert messages[-1]["type"] == "stats", messages[-1]
        return [m["step"]["text"] for m in messages if m["type"] in ("verified", "fallback")]

    async with serving(reasoner, max_active=3) as server:
        results = await asyncio.gather(*(one(server, i) for i in range(8)))
        assert all(r == TARGET for r in results)
        stats = server.stats()
        assert stats.totals["completed"] == 8 and stats.active_requests == 0 and stats.in_flight == 0
    assert idle(reasoner)


async def test_shutdown_closes_1001_and_cancels_running_requests() -> None:
    reasoner = make_reasoner(delay=0.05)
    server = DreamrServer(reasoner, ServerSettings(port=0))
    await server.start()
    async with client(server) as ws:
        await ws.send(ask())
        assert (await recv(ws))["type"] == "started"
        await server.stop()  # returns once every handler, and so every request, has finished
        assert idle(reasoner)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.GOING_AWAY


class SlowToClose(Reasoner):
    """Its event stream takes a while to wind down after the last event (as a busy engine can)."""

    async def astream_events(self, *args: Any, **kwargs: Any) -> AsyncIterator[Event]:  # type: ignore[override]
        async for event in super().astream_events(*args, **kwargs):
            yield event
        await asyncio.sleep(0.1)


async def test_next_request_right_after_stats_is_accepted() -> None:
    """A request is over for the client at its last message, even while its stream still closes."""
    fake = make_reasoner()
    reasoner = SlowToClose(fake.target.backend, fake.draft.backend if fake.draft else None, config=fake.config)
    async with serving(reasoner) as server, client(server) as ws:
        for i in range(3):
            await ws.send(ask(id=f"n{i}", options={"drafts": False}))
            messages = await until_terminal(ws)
            assert messages[-1]["type"] == "stats", messages[-1]
    assert server.totals["completed"] == 3
