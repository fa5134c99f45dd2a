"""Bad clients and failures: each bad input gets an error event or a close code, and the server
keeps serving; a client that leaves stops its work; a client that stops reading is cut off."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Sequence

import pytest
from dreamr_websocket.protocol import CloseCode, ServerStats
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from ws_support import ask, backends, client, http_get, idle, make_reasoner, png_b64, recv, serving, until_terminal

pytestmark = pytest.mark.asyncio


async def still_serving(server) -> None:  # type: ignore[no-untyped-def]
    """A fresh client gets a full answer: the server survived whatever came before."""
    async with client(server) as ws:
        await ws.send(ask(id="after"))
        assert (await until_terminal(ws))[-1]["type"] == "stats"


async def expect_error(ws, payload: str, code: str) -> dict:  # type: ignore[no-untyped-def]
    await ws.send(payload)
    message = await recv(ws)
    assert message["type"] == "error" and message["code"] == code, message
    return message


async def test_oversize_upload_closes_1009_and_server_keeps_serving() -> None:
    async with serving(make_reasoner(), max_message_bytes=64 * 1024) as server:
        async with client(server, max_size=None) as ws:
            await ws.send(ask(image="A" * 100_000))
            with pytest.raises(ConnectionClosed) as info:
                await recv(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.MESSAGE_TOO_BIG
        await still_serving(server)


async def test_non_json_is_an_error_event_and_the_connection_stays_open() -> None:
    reasoner = make_reasoner()
    async with serving(reasoner) as server, client(server) as ws:
        await expect_error(ws, "this is not json", "bad_json")
        await ws.send(ask(id="next"))
        assert (await until_terminal(ws))[-1]["type"] == "stats"
        assert server.totals["bad_messages"] == 1


async def test_wrong_fields_are_bad_request() -> None:
    async with serving(make_reasoner()) as server, client(server) as ws:
        error = await expect_error(ws, json.dumps({"v": 1, "type": "ask", "id": "w", "question": "q"}), "bad_request")
        assert "image" in error["message"] and error["id"] == "w"
        await expect_error(ws, json.dumps({"v": 1, "type": "ask", "image": 5, "question": "q"}), "bad_request")
        await expect_error(ws, json.dumps({"v": 1, "type": "fly"}), "bad_request")
        await expect_error(ws, json.dumps({"v": 9, "type": "ask"}), "unsupported_version")
        await expect_error(ws, ask(question="   "), "invalid_question")
        await still_serving(server)


@pytest.mark.parametrize(
    "image",
    [
        "not base64 at all!",
        base64.b64encode(b"GIF89a but truncated").decode(),
        "data:image/png,rawbytes",
        png_b64(2),  # under the minimum side
        "/etc/hostname",  # a path: never opened
    ],
    ids=["not-base64", "not-an-image", "data-url-without-base64", "too-small", "a-file-path"],
)
async def test_bad_image_is_invalid_image(image: str) -> None:
    reasoner = make_reasoner()
    async with serving(reasoner) as server, client(server) as ws:
        await expect_error(ws, ask(image=image), "invalid_image")
        assert server.totals["rejected_input"] == 1 and server.stats().active_requests == 0
        assert all(b.calls == 0 for b in backends(reasoner))  # rejected before any model work
        await still_serving(server)


async def test_unknown_option_is_invalid_option() -> None:
    async with serving(make_reasoner()) as server, client(server) as ws:
        error = await expect_error(ws, ask(options={"temperature": 0.7}), "invalid_option")
        assert "temperature" in error["message"]
        await expect_error(ws, ask(options={"max_steps": 10_000}), "invalid_option")  # over the server's cap
        await still_serving(server)


async def test_binary_frame_closes_1003() -> None:
    async with serving(make_reasoner()) as server:
        async with client(server) as ws:
            await ws.send(b"\x00\x01binary")
            with pytest.raises(ConnectionClosed) as info:
                await recv(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == CloseCode.UNSUPPORTED_DATA
        await still_serving(server)


async def test_model_error_is_an_error_event() -> None:
    reasoner = make_reasoner(fail_at_call=3)
    async with serving(reasoner) as server, client(server) as ws:
        await ws.send(ask(id="boom"))
        messages = await until_terminal(ws)
        assert messages[-1]["type"] == "error" and messages[-1]["code"] == "model_error"
        assert "injected failure" in messages[-1]["message"] and messages[-1]["id"] == "boom"
        assert idle(reasoner)
        backends(reasoner)[0].fail_at_call = None  # the model recovers; the same connection goes on
        await ws.send(ask(id="ok"))
        assert (await until_terminal(ws))[-1]["type"] == "stats"
        assert server.totals["failed"] == 1


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_disconnect_mid_stream_stops_the_request_work(how: str) -> None:
    reasoner = make_reasoner(delay=0.05)  # a request takes ~1 s of model calls
    async with serving(reasoner) as server:
        async with client(server) as ws:
            await ws.send(ask())
            while (await recv(ws))["type"] not in ("verified", "fallback"):
                pass
            assert reasoner.active_requests == 1
            t0 = time.monotonic()
            if how == "abort":
                ws.transport.abort()  # no close frame: a crashed client or a dropped network
            else:
                await ws.close()
        await_s = 0.0
        while not (idle(reasoner) and server.stats().active_requests == 0):
            await asyncio.sleep(0.01)
            await_s = time.monotonic() - t0
            assert await_s < 1.0, "the request kept running after its client left"
        calls = [b.calls for b in backends(reasoner)]
        await asyncio.sleep(0.2)
        assert [b.calls for b in backends(reasoner)] == calls, "model calls continued after the disconnect"
        _, _, body = await http_get(server, "/stats")
        stats = ServerStats.model_validate_json(body)
        assert stats.engine_requests == 0 and stats.in_flight == 0 and stats.totals["cancelled"] == 1


def _big_policy(question: str, prefix: Sequence[str]) -> str | None:
    """Huge steps for the 'big' question (megabytes of events), short ones otherwise."""
    if question.startswith("big"):
        word = "x" * 50_000
        return (f"step{len(prefix)} " + " ".join([word] * 5)) if len(prefix) < 23 else "Answer: 1"
    steps = ["read", "Answer: 2"]
    return steps[len(prefix)] if len(prefix) < len(steps) else None


async def test_slow_reader_is_aborted_and_never_stalls_the_others() -> None:
    reasoner = make_reasoner(target=_big_policy, draft=_big_policy)
    async with serving(reasoner, send_timeout_s=0.5, max_message_bytes=2**20) as server:
        # a client that sends one request and never reads: tiny receive buffer, one-frame queue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        slow = await connect(server.ws_url, sock=sock, max_queue=1, max_size=None, compression=None)
        await slow.send(ask(question="big question"))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        async with client(server) as ws:  # meanwhile, a well-behaved client is served at once
            await ws.send(ask(question="small question"))
            messages = await until_terminal(ws, within_s=5)
        assert messages[-1]["type"] == "stats" and time.monotonic() - t0 < 3.0
        deadline = time.monotonic() + 5
        while server.totals["slow_client_aborts"] == 0:
            assert time.monotonic() < deadline, "the slow reader was never cut off"
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 2
        while not (idle(reasoner) and server.stats().active_requests == 0):
            assert time.monotonic() < deadline, "the slow reader's request kept running"
            await asyncio.sleep(0.02)
        assert server.totals["completed"] == 1 and server.totals["client_gone"] == 1
        with pytest.raises(ConnectionClosed):  # the slow client finds its connection aborted (1006)
            while True:
                await asyncio.wait_for(slow.recv(), 5)
        await slow.close()


async def test_a_queued_client_that_leaves_gives_up_its_place() -> None:
    reasoner = make_reasoner(delay=0.03)
    async with serving(reasoner, max_active=1, max_waiting=1) as server:
        async with client(server) as a:
            await a.send(ask(id="a"))
            assert (await recv(a))["type"] == "started"
            async with client(server) as b:
                await b.send(ask(id="b"))
                assert (await recv(b))["type"] == "queued"
                b.transport.abort()
            deadline = time.monotonic() + 2
            while server.stats().queued:
                assert time.monotonic() < deadline, "the waiting room kept a client that left"
                await asyncio.sleep(0.01)
            assert (await until_terminal(a))[-1]["type"] == "stats"
        await still_serving(server)  # the freed place is usable: max_waiting=1 is not exhausted
        assert server.totals["cancelled"] == 1 and idle(reasoner)
