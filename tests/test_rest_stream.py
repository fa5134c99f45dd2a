"""The target writing the rest of an answer alone in ONE streamed completion
(``backends.step_stream``, ``OpenAICompatBackend.generate_rest``, ``engine.calls.write_alone``):
steps cut as ``generate_step`` cuts them, one request for all of them, and the engine's
target-alone paths (the target-only method, a request gone alone) using it."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import anyio
import httpx
import pytest
from dreamr_vllm import VLLMBackend, VLLMError
from PIL import Image

from dreamr_stream.backends.base import StepOutput
from dreamr_stream.backends.fake import AsyncScriptedBackend, ScriptedBackend
from dreamr_stream.backends.step_stream import StepReader, StepSplitter
from dreamr_stream.config import ReasonerConfig, SchedulingConfig, VerificationConfig
from dreamr_stream.reasoner import Reasoner

URL = "http://127.0.0.1:9999/v1"
IMAGE = Image.new("RGB", (16, 16), (1, 2, 3))
SOLUTION = ["Row 0: red", "Row 1: blue", "two colours", "Answer: 2"]


def delta(text: str, finish: str | None = None, stop_reason: Any = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish, "stop_reason": stop_reason}
    return {"choices": [choice]}


def usage(tokens: int) -> dict[str, Any]:
    return {"choices": [], "usage": {"completion_tokens": tokens}}


def sse(chunks: list[dict[str, Any]]) -> httpx.Response:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def words(text: str) -> Iterator[str]:
    """A text as a model streams it: one chunk per word (its leading space included)."""
    parts = text.split(" ")
    yield parts[0]
    for p in parts[1:]:
        yield " " + p


async def chunks_of(items: list[dict[str, Any]]) -> AsyncGenerator[dict[str, Any], None]:
    for item in items:
        yield item


def eos(choice: Any) -> bool:
    return bool(choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None)


# ---------------------------------------------------------------------- the splitter and reader
def test_the_splitter_cuts_at_the_delimiter_wherever_it_falls_in_a_piece() -> None:
    s = StepSplitter("\n", max_tokens=10)
    assert s.feed("Row 0:") == [] and s.feed(" red") == []
    [step] = s.feed(".\nRow")  # a piece spanning the delimiter counts to the step it ends
    assert (step.text, step.new_tokens, step.eos) == ("Row 0: red.", 3, False)
    assert s.text == "Row" and s.tokens == 0
    two = s.feed(" 1\nx\n")
    assert [o.text for o in two] == ["Row 1", "x"]


def test_the_splitter_caps_a_step_and_the_servers_usage_corrects_the_last_step() -> None:
    s = StepSplitter("\n", max_tokens=3)
    s.feed("a")
    s.feed(" b")
    assert not s.capped
    s.feed(" c")
    assert s.capped and s.cut().text == "a b c"
    s.feed("Answer")
    s.feed(": 2")
    last = s.cut(eos=True, total_tokens=7)
    assert (last.text, last.eos, last.new_tokens) == ("Answer: 2", True, 4)  # 7 in all, 3 before


@pytest.mark.asyncio
async def test_the_reader_keeps_a_finish_that_came_with_a_delimiter() -> None:
    """The finish reason arrives in the chunk that also ends a step: the next read still knows
    how the stream ended (and the usage that follows)."""
    items = [delta("Row 0"), delta("\n"), delta("Answer: 2"), delta("\n", "stop", None), usage(5)]
    reader = StepReader(chunks_of(items), StepSplitter("\n", 32), eos)
    assert [o.text for o in await reader.next_steps()] == ["Row 0"]
    assert [o.text for o in await reader.next_steps()] == ["Answer: 2"]
    [last] = await reader.next_steps()
    assert (last.text, last.eos) == ("", True) and reader.over
    assert await reader.next_steps() == []


@pytest.mark.asyncio
async def test_a_stream_without_a_finish_reason_is_an_error() -> None:
    reader = StepReader(chunks_of([delta("Row 0")]), StepSplitter("\n", 32), eos)
    with pytest.raises(ValueError, match="finish reason"):
        await reader.next_steps()


# ---------------------------------------------------------------------- over a served model
class Server:
    """A mock vLLM that writes ``SOLUTION`` from wherever the assistant message stops, one
    chunk per word, honouring ``stop`` and ``max_tokens`` as vLLM does."""

    def __init__(self, solution: list[str] = SOLUTION) -> None:
        self.solution = solution
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        messages = body["messages"]
        written = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        # the model's next line follows each line written (a capped one included)
        done, begun = written.count("\n"), written.split("\n")[-1]
        line = self.solution[done]
        assert line.startswith(begun), (written, self.solution)
        rest = "\n".join([line[len(begun) :], *self.solution[done + 1 :]])
        stops, cap = body.get("stop") or [], body.get("max_tokens")
        out: list[dict[str, Any]] = []
        sent = 0
        for piece in _pieces(rest):
            if cap is not None and sent == cap:
                out.append(delta("", "length"))
                return sse([*out, usage(sent)])
            sent += 1
            if stops and piece == "\n":  # the stop string ends it, unsent
                out.append(delta("", "stop", "\n"))
                return sse([*out, usage(sent)])
            out.append(delta(piece))
        out.append(delta("", "stop", None))  # the end of sequence
        return sse([*out, usage(sent)])


def _pieces(text: str) -> Iterator[str]:
    for i, line in enumerate(text.split("\n")):
        if i:
            yield "\n"
        if line:
            yield from words(line)


def served(server: Server) -> VLLMBackend:
    return VLLMBackend(URL, model="target", transport=httpx.MockTransport(server))


async def _per_step(server: Server, **kw: Any) -> tuple[list[StepOutput], str]:
    b = served(server)
    s = await b.open_session(IMAGE, "q?")
    outs = []
    while not s.finished and len(outs) < 10:
        outs.append(await b.generate_step(s, stop="\n", **kw))
    return outs, s.text


@pytest.mark.asyncio
async def test_the_rest_in_one_request_equals_one_request_per_step() -> None:
    server = Server()
    b = served(server)
    s = await b.open_session(IMAGE, "q?")
    rest = [o async for o in b.generate_rest(s, max_tokens=32, stop="\n", max_steps=10)]
    assert len(server.bodies) == 1
    body = server.bodies[0]
    assert "stop" not in body and "max_tokens" not in body and body["stream"] and body["add_generation_prompt"]
    stepwise, text = await _per_step(Server(), max_tokens=32)
    assert [(o.text, o.eos) for o in rest] == [(o.text, o.eos) for o in stepwise]
    assert s.text == text and s.finished
    # tokens as the server counts them, the delimiter's included; the last from its usage
    assert [o.new_tokens for o in rest] == [o.new_tokens for o in stepwise] == [4, 4, 3, 2]


@pytest.mark.asyncio
async def test_a_capped_step_restarts_the_stream_from_the_session() -> None:
    server = Server(["one two three four five", "Answer: 1"])
    b = served(server)
    s = await b.open_session(IMAGE, "q?")
    rest = [o async for o in b.generate_rest(s, max_tokens=3, stop="\n", max_steps=10)]
    stepwise, text = await _per_step(Server(["one two three four five", "Answer: 1"]), max_tokens=3)
    assert [o.text for o in rest] == [o.text for o in stepwise] == ["one two three", "Answer: 1"]
    assert s.text == text == "one two three\nAnswer: 1" and s.finished
    assert len(server.bodies) == 2  # the cap closed the first stream; the next step began a new one


@pytest.mark.asyncio
async def test_the_rest_continues_a_begun_step_and_stops_at_max_steps() -> None:
    server = Server()
    b = served(server)
    s = await b.open_session(IMAGE, "q?")
    await b.append(s, "Row 0: red", stop="\n")
    await b.begin_step(s, "Row 1:")
    rest = [o async for o in b.generate_rest(s, max_tokens=32, stop="\n", max_steps=2)]
    assert [o.text for o in rest] == ["Row 1: blue", "two colours"]
    assert s.text == "Row 0: red\nRow 1: blue\ntwo colours\n" and not s.finished and s.partial == ""
    assert server.bodies[0]["messages"][-1]["content"] == "Row 0: red\nRow 1:"


@pytest.mark.asyncio
async def test_leaving_early_closes_the_stream() -> None:
    closed = anyio.Event()

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncGenerator[bytes, None]:
            yield f"data: {json.dumps(delta('Row 0'))}\n\ndata: {json.dumps(delta(chr(10)))}\n\n".encode()
            await anyio.sleep(30)  # the server would go on writing

        async def aclose(self) -> None:
            closed.set()

    b = VLLMBackend(URL, model="target", transport=httpx.MockTransport(lambda _: httpx.Response(200, stream=Body())))
    s = await b.open_session(IMAGE, "q?")
    with anyio.fail_after(5):
        async for out in b.generate_rest(s, max_tokens=32, stop="\n", max_steps=10):
            assert out.text == "Row 0"
            break
        await closed.wait()
    assert s.text == "Row 0\n"


@pytest.mark.asyncio
async def test_a_broken_rest_stream_is_a_typed_error() -> None:
    b = VLLMBackend(URL, model="target", transport=httpx.MockTransport(lambda _: sse([delta("Row 0")])))
    s = await b.open_session(IMAGE, "q?")
    with pytest.raises(VLLMError, match="without a finish reason"):
        async for _ in b.generate_rest(s, max_tokens=32, stop="\n", max_steps=10):
            pass


# ---------------------------------------------------------------------- the engine
def _reasoner(target: AsyncScriptedBackend, draft: Any = None, **scheduling: Any) -> Reasoner:
    config = ReasonerConfig(
        verification=VerificationConfig(mode="judge", tau=1.0), scheduling=SchedulingConfig(**scheduling)
    )
    return Reasoner(target=target, draft=draft, config=config)


@pytest.mark.asyncio
async def test_the_target_only_method_asks_a_streaming_backend_once() -> None:
    target = AsyncScriptedBackend(SOLUTION)
    result = await _reasoner(target).ainvoke(IMAGE, "q?", method="target_only")
    assert [s.text for s in result.steps] == SOLUTION and result.answer == "2"
    assert target.rest_calls == 1
    assert [span.what for span in result.stats.timeline if span.lane == "target"] == ["prefill"] + ["write"] * 4
    plain = AsyncScriptedBackend(SOLUTION, streams_rest=False)
    stepwise = await _reasoner(plain).ainvoke(IMAGE, "q?", method="target_only")
    assert [s.text for s in stepwise.steps] == SOLUTION and plain.rest_calls == 0
    assert result.stats.target_tokens == stepwise.stats.target_tokens


@pytest.mark.asyncio
async def test_a_request_gone_alone_under_load_writes_the_rest_in_one_call() -> None:
    target = AsyncScriptedBackend(SOLUTION, token_delay_s=0.03)  # the first runs for at least 0.17 s
    draft = ScriptedBackend(SOLUTION)
    results = []
    reasoner = _reasoner(target, draft, max_speculating=1)

    async def one() -> None:
        results.append(await reasoner.ainvoke(IMAGE, "q?"))

    async with anyio.create_task_group() as tg:  # the second finds one request in flight
        tg.start_soon(one)
        await anyio.sleep(0.02)
        tg.start_soon(one)
    # the second starts alone; the first, speculating, goes alone as the second arrives
    assert all((r.stats.target_alone_reason or "").startswith("load") for r in results)
    assert sorted(r.stats.target_alone_from or 0 for r in results)[0] == 0
    assert all([s.text for s in r.steps] == SOLUTION for r in results)
    assert target.rest_calls == 2  # one streamed rest per request


@pytest.mark.asyncio
async def test_a_failed_draft_leaves_the_rest_to_one_call() -> None:
    target = AsyncScriptedBackend(SOLUTION)
    draft = ScriptedBackend(SOLUTION, fail_at_call=2)  # it opens, then its first step fails
    result = await _reasoner(target, draft).ainvoke(IMAGE, "q?")
    assert [s.text for s in result.steps] == SOLUTION
    assert (result.stats.target_alone_reason or "").startswith("draft failed")
    assert target.rest_calls == 1
