"""The OpenAI endpoints in a small Starlette app over scripted models: each bad input gets its
status and OpenAI error object and the app keeps serving; busy, rate and shutdown are 429 / 503;
a client that leaves or stops reading stops its request; and the real openai SDK, against a
real uvicorn server, reads verified steps as reasoning and the answer as content."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import openai
import pytest
import uvicorn
from dreamr_websocket.admission import Admission, RequestRate
from dreamr_websocket.openai_routes import api_routes
from dreamr_websocket.served import ServedTasks
from dreamr_websocket.settings import ServerSettings
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.applications import Starlette
from starlette.types import Message
from ws_support import QUESTION, TARGET, backends, idle, make_reasoner, png_b64, wait_until

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.reasoner import Reasoner

pytestmark = pytest.mark.asyncio
PATH = "/v1/chat/completions"
IMAGE = f"data:image/png;base64,{png_b64()}"


@dataclass
class FakeHost:
    """An ``ApiHost`` as the app will be: two tasks (one Reasoner behind both), one admission,
    the server's counters."""

    tasks: ServedTasks
    settings: ServerSettings
    admission: Admission
    rate: RequestRate | None
    decode_limiter: anyio.CapacityLimiter | None
    totals: Counter[str] = field(default_factory=Counter)
    closing: bool = False

    @property
    def reasoner(self) -> Reasoner:
        return self.tasks.default.reasoner


def make_host(reasoner: Reasoner | None = None, **settings: Any) -> FakeHost:
    s = ServerSettings(**settings)
    rate = RequestRate(s.requests_per_minute) if s.requests_per_minute is not None else None
    admission = Admission(s.max_active, s.max_waiting, s.max_held_image_bytes)
    shared = reasoner or make_reasoner()
    tasks = ServedTasks({"demo": shared, "other": shared})  # model ids dreamr-demo, dreamr-other
    return FakeHost(tasks, s, admission, rate, anyio.CapacityLimiter(2))


@asynccontextmanager
async def hosted(
    reasoner: Reasoner | None = None, **settings: Any
) -> AsyncIterator[tuple[FakeHost, httpx.AsyncClient]]:
    host = make_host(reasoner, **settings)
    app = Starlette(routes=api_routes(host))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
            yield host, c
    finally:
        host.reasoner.close()


def request(*, image: str = IMAGE, question: str = QUESTION, **fields: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]
    return {"model": "dreamr-demo", "messages": [{"role": "user", "content": content}], **fields}


def events(response: httpx.Response) -> list[dict[str, Any] | str]:
    """The SSE stream's events: each ``data:`` JSON object, and ``[DONE]``."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out: list[dict[str, Any] | str] = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chunks_of(response: httpx.Response) -> list[dict[str, Any]]:
    """The chunks of a stream that ended well, each validated as the SDK's own type."""
    got = events(response)
    assert got[-1] == "[DONE]" and all(isinstance(e, dict) for e in got[:-1])
    chunks = [e for e in got[:-1] if isinstance(e, dict)]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    return chunks


def delta_texts(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code is None or error["code"] == code, error
    return dict(error)


async def still_serving(c: httpx.AsyncClient) -> None:
    response = await c.post(PATH, json=request())
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "4"


# ---------------------------------------------------------------- the happy paths
async def test_a_stream_sends_verified_steps_as_reasoning_and_the_answer_as_content() -> None:
    async with hosted() as (host, c):
        response = await c.post(PATH, json=request(stream=True, stream_options={"include_usage": True}, tau=1.0))
        assert response.status_code == 200 and response.headers["cache-control"] == "no-cache"
        chunks = chunks_of(response)
        assert delta_texts(chunks, "reasoning") == "\n".join(TARGET)  # the draft's wrong step was replaced
        assert delta_texts(chunks, "reasoning_content") == "\n".join(TARGET)
        assert delta_texts(chunks, "content") == "4"
        sources = [
            c["choices"][0]["delta"]["dreamr"]["step"]["source"]
            for c in chunks
            if c["choices"] and "reasoning" in c["choices"][0]["delta"]
        ]
        assert sources == ["draft", "target", "draft", "draft"]
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 13
        assert host.totals["requests"] == host.totals["completed"] == 1 and idle(host.reasoner)
        assert host.admission.active == 0 and host.admission.image_bytes == 0


async def test_a_non_streamed_request_is_one_completion_equal_to_ainvoke() -> None:
    async with hosted() as (host, c):
        response = await c.post(PATH, json=request(model="dreamr-other"))
        completion = ChatCompletion.model_validate(response.json())
        result = await host.reasoner.ainvoke(base64.b64decode(png_b64()), QUESTION)
        message = completion.choices[0].message
        assert completion.model == "dreamr-other" and message.content == result.answer == "4"
        assert (message.model_extra or {})["reasoning"] == result.text
        assert completion.choices[0].finish_reason == "stop" and host.totals["completed"] == 1


async def test_models_lists_the_served_names() -> None:
    async with hosted() as (_, c):
        listing = (await c.get("/v1/models")).json()
        assert listing["object"] == "list"
        assert [Model.model_validate(m).id for m in listing["data"]] == ["dreamr-demo", "dreamr-other"]


async def test_a_request_without_a_model_gets_the_first() -> None:
    async with hosted() as (_, c):
        body = request()
        del body["model"]
        assert (await c.post(PATH, json=body)).json()["model"] == "dreamr-demo"


# ---------------------------------------------------------------- bad input
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (request(image="/etc/passwd"), 400, "invalid_image", "messages.0.content.1.image_url.url"),
        (request(image="file:///etc/passwd"), 400, "invalid_image", "messages.0.content.1.image_url.url"),
        (request(image="http://127.0.0.1:1/cat.png"), 400, "invalid_image", "messages.0.content.1.image_url.url"),
        (request(image=NOT_AN_IMAGE), 400, "invalid_image", None),
        ({"model": "dreamr-demo", "messages": [{"role": "user", "content": QUESTION}]}, 400, "invalid_image", None),
        (request(temperature=0.7), 400, "unsupported_value", "temperature"),
        (request(n=2), 400, "unsupported_value", "n"),
        (request(model="gpt-4o"), 404, "model_not_found", "model"),
        (request(max_tokens="5"), 400, "invalid_request", "max_tokens"),
        (request(stream="yes"), 400, "invalid_request", "stream"),
        (request(lookahead=0), 400, "invalid_request", "lookahead"),
        (request(max_steps=10_000), 400, "invalid_option", None),
        (request(question="   "), 400, "invalid_question", None),
    ],
)
async def test_each_bad_input_gets_its_status_and_the_server_keeps_serving(
    body: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    async with hosted() as (host, c):
        for stream in (False, True):  # a stream's errors before its first chunk are HTTP errors too
            error = assert_error(await c.post(PATH, json={**body, "stream": body.get("stream", stream)}), status, code)
            assert param is None or error["param"] == param
        await still_serving(c)
        assert host.totals["completed"] == 1 and idle(host.reasoner)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1]", json.dumps(request()).replace('"model"', '"tau": Infinity, "model"').encode()],
)
async def test_bad_json_and_tau_infinity_are_400(raw: bytes) -> None:
    async with hosted() as (host, c):
        response = await c.post(PATH, content=raw, headers={"content-type": "application/json"})
        error = assert_error(response, 400, "invalid_request")
        assert b"Infinity" not in raw or error["param"] == "tau"
        assert host.totals["bad_messages"] == 1 and host.totals["requests"] == 0
        await still_serving(c)


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_is_413_without_reading_it_all(chunked: bool) -> None:
    big = request(image="data:image/png;base64," + png_b64(size=400, colour=(1, 2, 3)) + "A" * 200_000)
    raw = json.dumps(big).encode()
    pieces: list[int] = []

    async def upload() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 16_384):
            pieces.append(i)
            yield raw[i : i + 16_384]

    async with hosted(max_message_bytes=64 * 1024) as (_, c):
        content: Any = upload() if chunked else raw
        response = await c.post(PATH, content=content, headers={"content-type": "application/json"})
        error = assert_error(response, 413, "request_too_large")
        assert "65536 bytes" in error["message"]
        await still_serving(c)


# ---------------------------------------------------------------- refusals: busy, rate, shutting down
async def test_busy_is_429_with_retry_after_and_a_queued_stream_says_so() -> None:
    async with hosted(make_reasoner(delay=0.02), max_active=1, max_waiting=1) as (host, c):
        first = asyncio.create_task(c.post(PATH, json=request()))
        await wait_until(lambda: host.admission.active == 1, what="the first request runs")
        second = asyncio.create_task(c.post(PATH, json=request(stream=True)))
        await wait_until(lambda: host.admission.waiting == 1, what="the second request waits")
        response = await c.post(PATH, json=request(stream=True))
        error = assert_error(response, 429, "server_busy")
        assert error["type"] == "rate_limit_error" and response.headers["retry-after"] == "1"
        assert "busy" in error["message"] and host.totals["busy"] == 1
        assert (await first).status_code == 200
        queued = chunks_of(await second)
        assert queued[0]["choices"][0]["delta"]["dreamr"] == {
            "v": 1,
            "id": queued[0]["id"],
            "type": "queued",
            "position": 1,
        }
        assert delta_texts(queued, "content") == "4" and host.totals["completed"] == 2


async def test_over_the_rate_is_429_with_retry_after() -> None:
    async with hosted(requests_per_minute=1) as (host, c):
        assert (await c.post(PATH, json=request())).status_code == 200
        response = await c.post(PATH, json=request())
        error = assert_error(response, 429, "rate_limit_exceeded")
        assert "a minute" in error["message"] and 50 <= int(response.headers["retry-after"]) <= 60
        assert host.totals["rate_limited"] == 1 and host.totals["requests"] == 1


async def test_a_closing_server_is_503() -> None:
    async with hosted() as (host, c):
        host.closing = True
        error = assert_error(await c.post(PATH, json=request(stream=True)), 503, "shutting_down")
        assert error["type"] == "server_error" and host.totals["requests"] == 0


# ---------------------------------------------------------------- failures and limits
async def test_a_model_failure_mid_stream_is_an_error_event_then_done() -> None:
    async with hosted(make_reasoner(fail_at_call=3)) as (host, c):
        got = events(await c.post(PATH, json=request(stream=True)))
        assert got[-1] == "[DONE]" and isinstance(got[-2], dict)
        error = got[-2]["error"]
        assert (
            error["type"] == "server_error"
            and error["code"] == "model_error"
            and "injected failure" in error["message"]
        )
        for chunk in got[:-2]:
            assert isinstance(chunk, dict)
            ChatCompletionChunk.model_validate(chunk)
        assert host.totals["failed"] == 1 and idle(host.reasoner)
        backends(host.reasoner)[0].fail_at_call = None  # the model recovers: so does the server
        await still_serving(c)


async def test_a_model_failure_without_streaming_is_500() -> None:
    async with hosted(make_reasoner(fail_at_call=3)) as (host, c):
        error = assert_error(await c.post(PATH, json=request()), 500, "model_error")
        assert "injected failure" in error["message"] and host.totals["failed"] == 1 and idle(host.reasoner)


async def test_a_failure_before_the_first_event_keeps_its_status_when_streaming() -> None:
    target_only = Reasoner(ScriptedBackend(TARGET, name="target"))  # no draft: fpsr is refused
    async with hosted(target_only) as (host, c):
        error = assert_error(await c.post(PATH, json=request(stream=True)), 400, "invalid_option")
        assert "needs a draft" in error["message"] and host.totals["failed"] == 1
        response = await c.post(PATH, json=request(method="target_only"))
        assert response.json()["choices"][0]["message"]["content"] == "4"


@pytest.mark.parametrize("stream", [True, False])
async def test_max_tokens_ends_with_length_and_stops_the_request(stream: bool) -> None:
    async with hosted(make_reasoner(delay=0.02)) as (host, c):
        t0 = time.monotonic()
        body = request(stream=stream, max_tokens=4, stream_options={"include_usage": True})
        response = await c.post(PATH, json=body)
        if stream:
            chunks = chunks_of(response)
            assert (
                chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 4
            )
            assert delta_texts(chunks, "reasoning") == "read row one\nread"
        else:
            completion = ChatCompletion.model_validate(response.json())
            assert completion.choices[0].finish_reason == "length" and completion.choices[0].message.content is None
            assert completion.usage is not None and completion.usage.completion_tokens == 4
        assert time.monotonic() - t0 < 1.0 and idle(host.reasoner)  # cancelled, not run to the end
        assert host.totals["completed"] == 1


# ---------------------------------------------------------------- clients that leave or stop reading
def asgi_scope(body: bytes, spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }


async def call_app(
    app: Starlette,
    body: dict[str, Any],
    gone: anyio.Event,
    *,
    spec_version: str = "2.3",
    on_send: Callable[[Message], Awaitable[None]] | None = None,
) -> list[Message]:
    """Drive the app as an ASGI server does; ``gone`` set = the client disconnected."""
    raw = json.dumps(body).encode()
    inbox: list[Message] = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if on_send is not None:
            await on_send(message)

    await app(asgi_scope(raw, spec_version), receive, send)
    return sent


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_disconnects_cancels_its_request_at_once(stream: bool, spec_version: str) -> None:
    host = make_host(make_reasoner(delay=0.05))  # a request takes about a second of model calls
    app = Starlette(routes=api_routes(host))
    gone = anyio.Event()
    try:
        task = asyncio.create_task(call_app(app, request(stream=stream), gone, spec_version=spec_version))
        await wait_until(lambda: host.reasoner.in_flight > 0 and host.reasoner.active_requests == 1)
        t0 = time.monotonic()
        gone.set()  # while a model call runs and nothing is being sent
        await asyncio.wait_for(task, 2)
        assert time.monotonic() - t0 < 0.5 and idle(host.reasoner)
        calls = [b.calls for b in backends(host.reasoner)]
        await asyncio.sleep(0.2)
        assert [b.calls for b in backends(host.reasoner)] == calls, "model calls went on after the client left"
        assert host.totals["cancelled"] == 1 and host.admission.active == 0 and host.admission.image_bytes == 0
    finally:
        host.reasoner.close()


async def test_a_client_that_stops_reading_is_given_up_after_send_timeout() -> None:
    host = make_host(make_reasoner(delay=0.01), send_timeout_s=0.3)
    app = Starlette(routes=api_routes(host))
    bodies = 0

    async def stuck_after_two(message: Message) -> None:
        nonlocal bodies
        bodies += message["type"] == "http.response.body"
        if bodies > 2:
            await anyio.sleep_forever()  # its buffers are full: the send never completes

    try:
        t0 = time.monotonic()
        sent = await asyncio.wait_for(call_app(app, request(stream=True), anyio.Event(), on_send=stuck_after_two), 3)
        assert time.monotonic() - t0 < 2.0 and sent[0]["status"] == 200
        assert host.totals["client_gone"] == host.totals["slow_client_aborts"] == 1
        assert idle(host.reasoner) and host.admission.active == 0
    finally:
        host.reasoner.close()


# ---------------------------------------------------------------- a real server, the real SDK
@asynccontextmanager
async def uvicorn_serving(host: FakeHost) -> AsyncIterator[str]:
    """The app on uvicorn on a free loopback port; yields the ``/v1`` base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = Starlette(routes=api_routes(host))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started, what="uvicorn started")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        await task
        host.reasoner.close()


async def test_the_openai_sdk_streams_and_invokes_against_uvicorn() -> None:
    host = make_host()
    async with uvicorn_serving(host) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        messages: Any = request()["messages"]
        stream = await client.chat.completions.create(
            model="dreamr-demo",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"tau": 1.0, "method": "fpsr"},
        )
        reasoning, content, finish, usage = [], [], None, None
        async for chunk in stream:
            assert isinstance(chunk, ChatCompletionChunk)
            ChatCompletionChunk.model_validate(chunk.model_dump())
            usage = chunk.usage or usage
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning.append((delta.model_extra or {}).get("reasoning") or "")
                content.append(delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(reasoning) == "\n".join(TARGET) and "".join(content) == "4" and finish == "stop"
        assert usage is not None and usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == 12

        completion = await client.chat.completions.create(model="dreamr-demo", messages=messages)
        assert completion.choices[0].message.content == "4"
        assert (completion.choices[0].message.model_extra or {})["reasoning"] == "\n".join(TARGET)

        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="dreamr-demo", messages=messages, temperature=0.7)
        assert bad.value.code == "unsupported_value" and bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-4o", messages=messages)
        assert [m.id async for m in client.models.list()] == ["dreamr-demo", "dreamr-other"]
        await client.close()
        assert host.totals["completed"] == 2 and idle(host.reasoner)


async def test_closing_the_sdks_stream_cancels_the_request_on_uvicorn() -> None:
    host = make_host(make_reasoner(delay=0.05))
    async with uvicorn_serving(host) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(model="dreamr-demo", messages=request()["messages"], stream=True)
        async for chunk in stream:
            if chunk.choices and (chunk.choices[0].delta.model_extra or {}).get("reasoning"):
                break  # one verified step read: leave
        assert host.reasoner.active_requests == 1
        await stream.close()
        await wait_until(lambda: idle(host.reasoner) and host.admission.active == 0, within_s=1.0, what="cancelled")
        assert host.totals["cancelled"] == 1
        await client.close()


def _big_steps(question: str, prefix: Sequence[str]) -> str | None:
    """Steps of about 250 kB each: a few fill any socket buffer."""
    return f"step{len(prefix)} " + " ".join(["x" * 50_000] * 5) if len(prefix) < 23 else "Answer: 1"


async def test_a_client_that_stops_reading_on_uvicorn_frees_its_slot() -> None:
    host = make_host(make_reasoner(target=_big_steps, draft=_big_steps), send_timeout_s=0.5)
    async with uvicorn_serving(host) as base_url:
        port = int(base_url.rsplit(":", 1)[1].split("/")[0])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        raw = json.dumps(request(stream=True)).encode()
        head = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(raw)}\r\n\r\n"
        await asyncio.get_running_loop().sock_sendall(sock, head.encode() + raw)  # and never reads
        await wait_until(lambda: host.totals["slow_client_aborts"] == 1, within_s=10, what="the slow reader cut off")
        await wait_until(lambda: idle(host.reasoner) and host.admission.active == 0, what="its request stopped")
        assert host.totals["client_gone"] == 1
        sock.close()
