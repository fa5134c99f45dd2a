"""ReasonerRunnable on the scripted reasoner: streaming, summing, events, config, sync/async, errors."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from dreamr_langchain import VERDICT_EVENT, ReasonerRunnable, ReasoningChunk, ReasoningInput, VerdictEvent
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from lc_support import DRAFT, NO_CACHE, TARGET, assert_closed, assert_idle, b64, make_reasoner, wait_idle
from PIL import Image

from dreamr_stream import BackendError, InputError, InvalidImageError, InvalidQuestionError, Reasoner, Step, StepSource

QUESTION = "how many?"


def comparable(steps: Any) -> list[tuple[Any, ...]]:
    """Step fields that do not depend on timing."""
    return [(s.index, s.text, s.source, s.verdict, s.rejected_draft, s.is_final) for s in steps]


class Recorder(BaseCallbackHandler):
    """Sync handler: what a tracer sees."""

    def __init__(self) -> None:
        self.chains: list[tuple[str, list[str]]] = []
        self.custom: list[tuple[str, Any]] = []

    def on_chain_start(self, serialized: Any, inputs: Any, *, tags: list[str] | None = None, **kw: Any) -> None:
        self.chains.append((kw.get("name", ""), tags or []))

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kw: Any) -> None:
        self.custom.append((name, data))


class AsyncRecorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.custom: list[str] = []

    async def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kw: Any) -> None:
        self.custom.append(name)


@pytest.mark.asyncio
async def test_astream_yields_one_chunk_per_verified_step(reasoner: Reasoner, png: bytes) -> None:
    runnable = ReasonerRunnable(reasoner)
    chunks = [c async for c in runnable.astream({"image": png, "question": QUESTION})]
    assert [len(c.steps) for c in chunks] == [1, 1, 1, 1]
    assert [c.steps[0].text for c in chunks] == TARGET
    assert [c.result is not None for c in chunks] == [False, False, False, True]  # only the last one
    expected = await reasoner.ainvoke(png, QUESTION)
    total = sum(chunks[1:], chunks[0])
    assert comparable(total.steps) == comparable(expected.steps)
    assert total.answer == expected.answer == "4"
    assert_idle(reasoner)


@pytest.mark.asyncio
async def test_invoke_and_ainvoke_return_every_step(reasoner: Reasoner, png: bytes) -> None:
    runnable = ReasonerRunnable(reasoner)
    expected = await reasoner.ainvoke(png, QUESTION)
    got_async = await runnable.ainvoke({"image": png, "question": QUESTION})
    got_sync = await asyncio.to_thread(runnable.invoke, {"image": png, "question": QUESTION})
    for got in (got_async, got_sync):
        assert isinstance(got, ReasoningChunk)
        assert comparable(got.steps) == comparable(expected.steps)
        assert got.result is not None and comparable(got.result.steps) == comparable(expected.steps)
        assert got.text == "\n".join(TARGET)
    # the rejected draft is recorded on the step that replaced it
    assert got_async.steps[1].source is StepSource.TARGET and got_async.steps[1].rejected_draft == DRAFT[1]


def test_sync_calls_work_inside_a_running_event_loop(reasoner: Reasoner, png: bytes) -> None:
    runnable = ReasonerRunnable(reasoner)

    async def inside() -> tuple[ReasoningChunk, list[ReasoningChunk], list[ReasoningChunk]]:
        request: ReasoningInput = {"image": png, "question": QUESTION}
        return runnable.invoke(request), list(runnable.stream(request)), runnable.batch([request, request])

    one, streamed, batched = asyncio.run(inside())
    assert [s.text for s in one.steps] == TARGET
    assert [c.steps[0].text for c in streamed] == TARGET
    assert [[s.text for s in b.steps] for b in batched] == [TARGET, TARGET]
    assert_idle(reasoner)


@pytest.mark.parametrize("form", ["bytes", "base64", "data_url", "path", "pil"])
def test_every_image_form_gives_the_same_steps(reasoner: Reasoner, png: bytes, tmp_path: Any, form: str) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(png)
    image: Any = {
        "bytes": png,
        "base64": b64(png),
        "data_url": "data:image/png;base64," + b64(png),
        "path": path,  # a file is a Path; a str is image data
        "pil": Image.new("RGB", (32, 32), (200, 10, 10)),
    }[form]
    got = ReasonerRunnable(reasoner).invoke({"image": image, "question": QUESTION})
    assert [s.text for s in got.steps] == TARGET


@pytest.mark.asyncio
async def test_astream_events_v2_streams_steps_and_verdicts(reasoner: Reasoner, png: bytes) -> None:
    runnable = ReasonerRunnable(reasoner, name="puzzle-reasoner")
    events = [
        e
        async for e in runnable.astream_events(
            {"image": png, "question": QUESTION},
            {"tags": ["t1"], "metadata": {"user": "u1"}, "run_name": "my-run"},
            version="v2",
        )
    ]
    streams = [e for e in events if e["event"] == "on_chain_stream"]
    verdicts = [e for e in events if e["event"] == "on_custom_event"]
    assert [e["data"]["chunk"].steps[0].text for e in streams] == TARGET
    assert all(e["name"] == "my-run" and "t1" in e["tags"] and e["metadata"]["user"] == "u1" for e in streams)
    assert {e["name"] for e in verdicts} == {VERDICT_EVENT}
    data = [e["data"] for e in verdicts if isinstance(e["data"], VerdictEvent)]
    assert len(data) == len(verdicts)
    # drafts of steps 0..3 are judged; step 1's draft is rejected and the target's own step follows
    assert [(d.index, d.text, d.accepted) for d in data] == [
        (0, DRAFT[0], True),
        (1, DRAFT[1], False),
        (2, DRAFT[2], True),
        (3, DRAFT[3], True),
    ]
    kinds = [e["event"] for e in events if e["event"] in ("on_chain_stream", "on_custom_event")]
    assert kinds.index("on_custom_event") < kinds.index("on_chain_stream")  # a step's verdict comes first
    end = next(e for e in events if e["event"] == "on_chain_end")
    assert [s.text for s in end["data"]["output"].steps] == TARGET


def test_callbacks_tags_and_run_name_propagate_on_the_sync_path(reasoner: Reasoner, png: bytes) -> None:
    recorder = Recorder()
    runnable = ReasonerRunnable(reasoner).with_config(run_name="named", tags=["a"])
    chunks = list(runnable.stream({"image": png, "question": QUESTION}, {"callbacks": [recorder], "tags": ["b"]}))
    assert len(chunks) == len(TARGET)
    assert recorder.chains and recorder.chains[0][0] == "named"
    assert {"a", "b"} <= set(recorder.chains[0][1])
    assert [name for name, _ in recorder.custom] == [VERDICT_EVENT] * 4


@pytest.mark.asyncio
async def test_async_callbacks_receive_verdicts(reasoner: Reasoner, png: bytes) -> None:
    recorder = AsyncRecorder()
    await ReasonerRunnable(reasoner).ainvoke({"image": png, "question": QUESTION}, {"callbacks": [recorder]})
    assert recorder.custom == [VERDICT_EVENT] * 4


@pytest.mark.asyncio
async def test_abatch_and_batch_equal_each_request_alone(png: bytes) -> None:
    reasoner = make_reasoner(delay=0.001)
    runnable = ReasonerRunnable(reasoner)
    requests: list[ReasoningInput] = [{"image": png, "question": f"q{i}"} for i in range(3)]
    alone = [comparable((await reasoner.ainvoke(png, f"q{i}")).steps) for i in range(3)]
    together = await runnable.abatch(requests)
    assert [comparable(c.steps) for c in together] == alone
    threaded = await asyncio.to_thread(runnable.batch, requests, {"max_concurrency": 3})
    assert [comparable(c.steps) for c in threaded] == alone
    assert_idle(reasoner)


@pytest.mark.asyncio
async def test_bind_overrides_the_method(reasoner: Reasoner, png: bytes) -> None:
    got = await ReasonerRunnable(reasoner).bind(method="target_only").ainvoke({"image": png, "question": QUESTION})
    assert [s.text for s in got.steps] == TARGET
    assert all(s.source is StepSource.TARGET and s.verdict is None for s in got.steps)


@pytest.mark.asyncio
async def test_leaving_astream_early_cancels_the_request(png: bytes) -> None:
    reasoner = make_reasoner(delay=0.01)
    async with aclosing(ReasonerRunnable(reasoner).astream({"image": png, "question": QUESTION})) as stream:
        async for chunk in stream:
            assert chunk.steps[0].index == 0
            break
    assert_closed(reasoner)  # the request is closed by the time aclose() returns
    await asyncio.to_thread(wait_idle, reasoner)


@pytest.mark.asyncio
async def test_a_plain_break_is_cleaned_up_too(png: bytes) -> None:
    reasoner = make_reasoner(delay=0.01)
    async for _ in ReasonerRunnable(reasoner).astream({"image": png, "question": QUESTION}):
        break
    for _ in range(100):  # the loop's async-generator finaliser closes it shortly after
        if reasoner.active_requests == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(wait_idle, reasoner)


def test_closing_the_sync_stream_early_cancels_the_request(png: bytes) -> None:
    reasoner = make_reasoner(delay=0.01)
    stream = ReasonerRunnable(reasoner).stream({"image": png, "question": QUESTION})
    first = next(stream)
    stream.close()
    assert first.steps[0].index == 0
    assert_closed(reasoner)
    wait_idle(reasoner)


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"question": QUESTION}, InvalidImageError),
        ({"image": None, "question": QUESTION}, InvalidImageError),
        ({"image": b"definitely not an image", "question": QUESTION}, InvalidImageError),
        ({"image": "not/a/file/and/not/base64!", "question": QUESTION}, InvalidImageError),
        ({"image": "PNG", "question": "   "}, InvalidQuestionError),
        ({"image": "PNG"}, InvalidQuestionError),
        ("just a string", InputError),
    ],
)
def test_bad_input_gives_a_clear_typed_error(reasoner: Reasoner, png: bytes, request_: Any, error: type) -> None:
    if isinstance(request_, dict) and request_.get("image") == "PNG":
        request_ = {**request_, "image": png}
    with pytest.raises(error) as info:
        ReasonerRunnable(reasoner).invoke(request_)
    assert isinstance(info.value, ValueError) and str(info.value)
    assert reasoner.target.calls == 0  # rejected before any model work


def test_a_string_image_is_data_never_a_file_name(reasoner: Reasoner, png: bytes, tmp_path: Path) -> None:
    """Input may come from a client or a model: a file is read only from a ``pathlib.Path``."""
    path = tmp_path / "puzzle.png"
    path.write_bytes(png)
    for name in (str(path), "/etc/passwd", "/etc/hostname"):
        with pytest.raises(InvalidImageError):
            ReasonerRunnable(reasoner).invoke({"image": name, "question": QUESTION})
    assert reasoner.target.calls == 0
    assert ReasonerRunnable(reasoner).invoke({"image": path, "question": QUESTION}).answer is not None


def test_unknown_call_options_are_rejected(reasoner: Reasoner, png: bytes) -> None:
    with pytest.raises(TypeError, match="unexpected keyword"):
        ReasonerRunnable(reasoner).invoke({"image": png, "question": QUESTION}, temprature=0.5)


@pytest.mark.asyncio
async def test_model_failure_surfaces_as_the_typed_error(png: bytes) -> None:
    reasoner = make_reasoner(fail_at_call=4)
    with pytest.raises(BackendError, match="injected failure"):
        await ReasonerRunnable(reasoner).ainvoke({"image": png, "question": QUESTION})
    assert_idle(reasoner)


@pytest.mark.asyncio
async def test_timeout_cancels_the_request(png: bytes) -> None:
    reasoner = make_reasoner(delay=0.05)
    with pytest.raises(TimeoutError, match=r"within 0\.1 s"):
        await ReasonerRunnable(reasoner, timeout_s=0.1).ainvoke({"image": png, "question": QUESTION})
    assert_closed(reasoner)
    await asyncio.to_thread(wait_idle, reasoner)


def test_chunks_add_up_and_keep_the_result() -> None:
    steps = [Step(index=i, text=t, source=StepSource.TARGET) for i, t in enumerate(TARGET)]
    parts = [ReasoningChunk(steps=(s,)) for s in steps]
    total = sum(parts[1:], parts[0])
    assert total.steps == tuple(steps) and total.result is None and total.answer is None
    assert total.text == "\n".join(TARGET)
    with pytest.raises(TypeError):
        _ = parts[0] + 1  # type: ignore[operator]


def test_config_override_is_used(png: bytes) -> None:
    reasoner = make_reasoner()
    from dreamr_stream import GenerationConfig, ReasonerConfig

    short = ReasonerConfig(generation=GenerationConfig(max_steps=2), cache=NO_CACHE.cache)
    got = ReasonerRunnable(reasoner, reasoner_config=short).invoke({"image": png, "question": QUESTION})
    assert [s.text for s in got.steps] == TARGET[:2]
    assert got.result is not None  # the last (max_steps) step carries the result
