"""A served model that stalls or is down never freezes requests: every call has a total deadline
(a server that trickles bytes never trips the per-read timeout), and a circuit breaker fails
calls at once while the server is down, probes it after a cool-down, and closes when it is back.
Against a fake OpenAI-compatible server on loopback, which counts the requests it gets."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import pytest
from dreamr_vllm import VLLMBackend, VLLMError
from PIL import Image

from dreamr_stream.backends.breaker import Admission, CircuitBreaker
from dreamr_stream.backends.call_context import calls_within, limit_s
from dreamr_stream.backends.fake import AsyncScriptedBackend
from dreamr_stream.backends.openai_compat import ChatSession
from dreamr_stream.config import CacheConfig, JudgeTemplate, ReasonerConfig, SchedulingConfig, VerificationConfig
from dreamr_stream.errors import BackendError
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.types import ReasoningResult, StepSource

IMAGE = Image.new("RGB", (16, 16), (1, 2, 3))
ANSWER = "Answer: 4"
T = TypeVar("T")


class FakeServer:
    """Answers every request as ``mode`` says: ``ok`` (a one-step answer, streamed or a judge's
    verdict, after ``delay_s``), ``fail`` (HTTP 500), ``trickle`` (headers, then one byte a
    second), ``stall`` (nothing at all, as a stopped server whose kernel still accepts);
    ``hits`` counts the requests it read."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.delay_s = 0.0
        self.hits = 0
        self.url = ""
        self.handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            self.hits += 1
            if self.mode == "stall":
                await asyncio.sleep(3600)
            await asyncio.sleep(self.delay_s)
            if self.mode == "trickle":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\n")
                for _ in range(100):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(1.0)
            writer.write(self.reply(json.loads(body) if body else {}))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went (at its deadline)
        finally:
            writer.close()

    def reply(self, request: dict[str, Any]) -> bytes:
        if self.mode == "fail":
            status, kind, text = "500 Internal Server Error", "text/plain", "engine dead"
        elif request.get("stream"):
            choice = {"index": 0, "delta": {"content": ANSWER}, "finish_reason": "stop", "stop_reason": None}
            status, kind, text = "200 OK", "text/event-stream", f"data: {json.dumps({'choices': [choice]})}\n\n"
            text += "data: [DONE]\n\n"
        else:
            verdict = {"logprobs": {"content": [{"top_logprobs": [{"token": " yes", "logprob": -0.1}]}]}}
            status, kind, text = "200 OK", "application/json", json.dumps({"choices": [verdict]})
        data = text.encode()
        return f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data


@asynccontextmanager
async def serving(mode: str) -> AsyncIterator[FakeServer]:
    server = FakeServer(mode)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1"
    try:
        yield server
    finally:
        listener.close()
        for task in server.handlers:  # a trickle goes on after its client left
            task.cancel()
        await asyncio.gather(*server.handlers, return_exceptions=True)


async def timed(call: Awaitable[T]) -> tuple[T | BaseException, float]:
    """What ``call`` returned or raised, and how long it took."""
    start = time.monotonic()
    try:
        result: T | BaseException = await call
    except Exception as e:
        result = e
    return result, time.monotonic() - start


async def step(backend: VLLMBackend) -> Any:
    session: ChatSession = await backend.open_session(IMAGE, "q?")
    return await backend.generate_step(session, max_tokens=8, stop="\n")


@pytest.mark.asyncio
async def test_a_trickling_server_fails_each_call_at_its_deadline() -> None:
    async with serving("trickle") as server:
        # a byte a second never trips the per-read timeout: only the call's deadline ends it
        b = VLLMBackend(server.url, model="m", timeout_s=3.0, step_deadline_s=2.0, score_deadline_s=1.0)
        error, took = await timed(step(b))
        assert isinstance(error, VLLMError) and error.unavailable
        assert re.search(f"streamed step at {server.url} failed: no complete answer within 2 s", str(error))
        assert 2.0 <= took < 3.0
        session = await b.open_session(IMAGE, "q?")
        error, took = await timed(b.score(session, "Row 1", stop="\n", judge=JudgeTemplate()))
        assert isinstance(error, VLLMError) and "within 1 s" in str(error) and 1.0 <= took < 2.0
        await b.aclose()


@pytest.mark.asyncio
async def test_the_breaker_fails_calls_at_once_while_the_server_is_down_and_probes_it_back() -> None:
    async with serving("fail") as server:
        b = VLLMBackend(server.url, model="m", breaker=CircuitBreaker(failures=3, cooldown_s=0.5, max_cooldown_s=5.0))
        for _ in range(3):
            error, _ = await timed(step(b))
            assert isinstance(error, VLLMError) and "HTTP 500: engine dead" in str(error)
        error, took = await timed(step(b))  # open: the server is not asked
        assert isinstance(error, VLLMError) and took < 0.1 and server.hits == 3
        pattern = r"the server at \S+ is unavailable since \d\d:\d\d:\d\d \(3 failed calls; next try in 0\.\d s\): "
        assert re.search(pattern + ".*HTTP 500", str(error)), error
        await anyio.sleep(0.5)
        error, _ = await timed(step(b))  # the probe goes through, and fails: open for twice as long
        assert "HTTP 500" in str(error) and server.hits == 4
        error, _ = await timed(step(b))
        assert re.search(r"next try in (0\.9|1\.0) s", str(error)) and server.hits == 4
        server.mode = "ok"  # the server is back
        await anyio.sleep(1.0)
        assert (await step(b)).text == ANSWER  # the probe
        assert (await step(b)).text == ANSWER and server.hits == 6  # closed again
        await b.aclose()


@pytest.mark.asyncio
async def test_a_server_refusing_connections_opens_the_breaker() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = VLLMBackend(f"http://127.0.0.1:{port}/v1", model="m", breaker=CircuitBreaker(failures=2, cooldown_s=30.0))
    for _ in range(2):
        error, _ = await timed(step(b))
        assert isinstance(error, VLLMError) and "ConnectError" in str(error) and error.unavailable
    error, took = await timed(step(b))
    assert isinstance(error, VLLMError) and "unavailable since" in str(error) and took < 0.05
    await b.aclose()


@pytest.mark.asyncio
async def test_requests_go_alone_at_once_while_the_draft_server_is_down() -> None:
    config = ReasonerConfig(cache=CacheConfig(enabled=False))
    async with serving("fail") as server:
        draft = VLLMBackend(server.url, model="d", name="draft", breaker=CircuitBreaker(failures=2, cooldown_s=60.0))
        r = Reasoner(AsyncScriptedBackend([ANSWER], name="target"), draft, config=config)
        for _ in range(4):
            result = await r.ainvoke(IMAGE, "q?")
            assert result.answer is not None and result.stats.target_alone_reason
        assert server.hits == 2 and "unavailable since" in (result.stats.target_alone_reason or "")
        r.close()


@pytest.mark.asyncio
async def test_a_stalled_draft_server_costs_a_request_a_few_seconds_and_the_breaker_keeps_later_ones_off_it() -> None:
    async with serving("stall") as server:
        # the draft's own deadlines are a target's (60 s a step): its role gives it a few seconds
        draft = VLLMBackend(server.url, model="d", name="draft", breaker=CircuitBreaker(failures=2, cooldown_s=60.0))
        r = Reasoner(
            AsyncScriptedBackend([ANSWER], name="target"),
            draft,
            config=ReasonerConfig(cache=CacheConfig(enabled=False)),
        )
        assert r.config.scheduling.draft_deadline_s == 5.0
        fast = ReasonerConfig(cache=CacheConfig(enabled=False), scheduling=SchedulingConfig(draft_deadline_s=1.0))
        results, times = [], []
        for _ in range(4):
            result, took = await timed(r.ainvoke(IMAGE, "q?", config=fast))
            assert isinstance(result, ReasoningResult) and result.answer == "4", result
            results.append(str(result.stats.target_alone_reason))
            times.append(took)
        # each of the first two waits the draft's second, then the target goes alone
        assert all(1.0 <= t < 2.0 for t in times[:2]), times
        assert all("streamed step" in why and "no complete answer within 1 s" in why for why in results[:2]), results
        # then the breaker is open: later requests never reach the stalled server
        assert all(t < 0.5 for t in times[2:]) and all("unavailable since" in why for why in results[2:]), results
        assert server.hits == 2
        r.close()


@pytest.mark.asyncio
async def test_by_default_a_stalled_draft_server_holds_a_request_five_seconds_not_the_step_deadline() -> None:
    async with serving("stall") as server:
        draft = VLLMBackend(server.url, model="d", name="draft")
        r = Reasoner(
            AsyncScriptedBackend([ANSWER], name="target"),
            draft,
            config=ReasonerConfig(cache=CacheConfig(enabled=False)),
        )
        result, took = await timed(r.ainvoke(IMAGE, "q?"))
        assert isinstance(result, ReasoningResult) and result.answer == "4"
        assert 5.0 <= took < 7.0 and "within 5 s" in str(result.stats.target_alone_reason)
        r.close()


@pytest.mark.filterwarnings("ignore::dreamr_stream.errors.UncalibratedVerificationWarning")  # deadlines, not TBVM
@pytest.mark.asyncio
async def test_the_draft_s_limit_is_the_draft_s_alone_a_slow_target_is_waited_for() -> None:
    config = ReasonerConfig(
        cache=CacheConfig(enabled=False),
        verification=VerificationConfig(mode="judge"),
        scheduling=SchedulingConfig(draft_deadline_s=0.5),
    )
    async with serving("ok") as server:
        server.delay_s = 1.0  # every answer of the target takes twice the draft's limit
        target = VLLMBackend(server.url, model="t", name="target")
        r = Reasoner(target, AsyncScriptedBackend([ANSWER], name="draft"), config=config)
        result, took = await timed(r.ainvoke(IMAGE, "q?"))
        assert isinstance(result, ReasoningResult) and result.answer == "4" and took >= 1.0
        assert not result.stats.target_alone_reason and result.steps[0].source is StepSource.DRAFT
        r.close()


@pytest.mark.filterwarnings("ignore::dreamr_stream.errors.UncalibratedVerificationWarning")  # deadlines, not TBVM
@pytest.mark.asyncio
async def test_requests_fail_fast_while_the_target_server_is_down_and_recover_when_it_is_back() -> None:
    config = ReasonerConfig(cache=CacheConfig(enabled=False), verification=VerificationConfig(mode="judge"))
    async with serving("fail") as server:
        target = VLLMBackend(server.url, model="t", name="target", breaker=CircuitBreaker(failures=2, cooldown_s=0.5))
        r = Reasoner(target, AsyncScriptedBackend([ANSWER], name="draft"), config=config)
        for _ in range(2):
            with pytest.raises(BackendError, match="HTTP 500"):
                await r.ainvoke(IMAGE, "q?")
        error, took = await timed(r.ainvoke(IMAGE, "q?"))
        assert isinstance(error, BackendError) and "unavailable since" in str(error) and took < 0.5
        assert server.hits == 2
        server.mode = "ok"
        await anyio.sleep(0.5)
        assert (await r.ainvoke(IMAGE, "q?")).answer is not None and server.hits > 2
        r.close()


def test_a_call_s_deadline_is_the_tighter_of_the_backend_s_own_and_its_caller_s_limit() -> None:
    assert limit_s(60.0) == 60.0  # no limit set: the backend's own
    with calls_within(5.0):
        assert limit_s(60.0) == 5.0 and limit_s(2.0) == 2.0
        with calls_within(10.0):  # an enclosing tighter limit still holds
            assert limit_s(60.0) == 5.0
        with calls_within(None):
            assert limit_s(60.0) == 5.0
    assert limit_s(60.0) == 60.0


def test_the_cool_down_doubles_up_to_its_cap_and_a_cancelled_probe_passes_its_turn() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=1, cooldown_s=1.0, max_cooldown_s=3.0, clock=lambda: now[0])
    breaker.failure("refused")
    assert breaker.open and "next try in 1.0 s" in (breaker.admit().refused or "")
    waits = []
    for _ in range(3):
        now[0] += 10
        assert breaker.admit().probe
        assert "a probe call is under way" in (breaker.admit().refused or "")  # one probe at a time
        breaker.failure("refused", probe=True)
        waits.append(re.findall(r"next try in (\S+) s", breaker.admit().refused or "")[0])
    assert waits == ["2.0", "3.0", "3.0"]
    now[0] += 10
    breaker.abandon(probe=breaker.admit().probe)  # the probe was cancelled: it told nothing
    assert breaker.admit().probe
    breaker.success()
    assert not breaker.open and breaker.admit() == Admission()
