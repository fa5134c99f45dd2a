"""One Reasoner shared by every kind of caller at once: sync, async on any loop (asyncio or trio),
LangChain's sync path, from several threads, with no deadlock and the same results as alone."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing, closing

import anyio
import pytest
from dreamr_langchain import ChatDreamr, ReasonerRunnable
from langchain_core.messages import HumanMessage
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, SchedulingConfig
from dreamr_stream.engine.owner import LoopBackend
from dreamr_stream.engine.runner import PriorityLock
from dreamr_stream.reasoner import Reasoner

IMAGE = Image.new("RGB", (32, 32), (200, 10, 10))
QUESTIONS = ("how many red?", "how many circles?", "how many in row two?")
ROUNDS = 20
HANG_S = 60.0  # a deadlock turns into a failure after this long


def _target(question: str, prefix: Sequence[str]) -> str | None:
    steps = [f"read {question}", "read row two", "count them up", f"Answer: {len(question)}"]
    return steps[len(prefix)] if len(prefix) < len(steps) else None


def _draft(question: str, prefix: Sequence[str]) -> str | None:
    """The target's steps but the second: one rejection (and a fallback) per request."""
    return "read row 2 wrongly" if len(prefix) == 1 else _target(question, prefix)


def make_reasoner(loop_backend: LoopBackend = "asyncio", delay: float = 0.0005) -> Reasoner:
    config = ReasonerConfig(
        cache=CacheConfig(enabled=False),  # every round goes to the models
        scheduling=SchedulingConfig(fallback="on", fallback_chunk_tokens=1),
    )
    target = ScriptedBackend(_target, name="target", token_delay_s=delay)
    draft = ScriptedBackend(_draft, name="draft", token_delay_s=delay / 2)
    return Reasoner(target, draft, config=config, loop_backend=loop_backend)


def assert_idle(r: Reasoner) -> None:
    assert r.active_requests == 0 and r.in_flight == 0
    for runner in (r.target, r.draft):
        assert runner is not None
        backend = runner.backend
        assert isinstance(backend, ScriptedBackend)
        assert backend.active_calls == 0 and backend.open_sessions == 0, backend.name


def run_together(workers: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[object]]:
    """Each worker in a thread of its own, ``rounds`` times, every round started together.
    Fails (instead of hanging) when a worker is not done within HANG_S."""
    barrier = threading.Barrier(len(workers))
    results: dict[str, list[object]] = {name: [] for name in workers}
    errors: list[tuple[str, BaseException]] = []

    def work(name: str, fn: Callable[[], object]) -> None:
        try:
            for _ in range(rounds):
                barrier.wait(HANG_S)
                results[name].append(fn())
        except BaseException as e:
            errors.append((name, e))
            barrier.abort()

    threads = [threading.Thread(target=work, args=item, name=item[0], daemon=True) for item in workers.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + HANG_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = {t.name: len(results[t.name]) for t in threads if t.is_alive()}
    assert not hung, f"deadlock: workers still running after {HANG_S} s (rounds done: {hung})"
    assert not errors, errors
    return results


def texts(steps: Sequence[object]) -> list[str]:
    return [s.text for s in steps]  # type: ignore[attr-defined]


def callers(r: Reasoner, backend: LoopBackend) -> dict[str, Callable[[], object]]:
    """Sync invoke, astream on a loop of the thread's own, and LangChain's sync invoke."""
    runnable = ReasonerRunnable(r)

    async def astream() -> list[str]:
        return [s.text async for s in r.astream(IMAGE, QUESTIONS[1])]

    return {
        "invoke": lambda: texts(r.invoke(IMAGE, QUESTIONS[0]).steps),
        "astream": lambda: anyio.run(astream, backend=backend),
        "langchain": lambda: texts(runnable.invoke({"image": IMAGE, "question": QUESTIONS[2]}).steps),
    }


@pytest.mark.parametrize(
    ("callers_on", "loop_backend"), [("asyncio", "asyncio"), ("trio", "asyncio"), ("trio", "trio")]
)
def test_sync_async_and_langchain_callers_share_one_reasoner(
    callers_on: LoopBackend, loop_backend: LoopBackend
) -> None:
    r = make_reasoner(loop_backend)
    try:
        alone = [texts(r.invoke(IMAGE, q).steps) for q in QUESTIONS]
        results = run_together(callers(r, callers_on), ROUNDS)
        assert results == {name: [expected] * ROUNDS for name, expected in zip(results, alone, strict=True)}
        assert_idle(r)
        # every round really raced: the models were shared, each request drafted and verified
        assert r.target.calls > 0 and r.draft is not None and r.draft.calls > 0
    finally:
        r.close()


def test_two_event_loops_of_different_libraries_share_one_reasoner() -> None:
    """The issue's repro: two threads each in ``anyio.run(reasoner.ainvoke, ...)`` (one asyncio, one trio)."""
    r = make_reasoner()
    try:
        alone = texts(r.invoke(IMAGE, QUESTIONS[0]).steps)

        def on(backend: str) -> Callable[[], object]:
            return lambda: texts(anyio.run(r.ainvoke, IMAGE, QUESTIONS[0], backend=backend).steps)

        results = run_together({"asyncio": on("asyncio"), "trio": on("trio")}, ROUNDS)
        assert results == {"asyncio": [alone] * ROUNDS, "trio": [alone] * ROUNDS}
        assert_idle(r)
    finally:
        r.close()


def test_the_chat_models_sync_path_beside_sync_invoke() -> None:
    """ChatDreamr's sync calls run on the LangChain bridge's own loop, which reaches the
    Reasoner's loop as any other loop does."""
    r = make_reasoner()
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG")
    image = {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode(), "mime_type": "image/png"}
    message = HumanMessage(content=[image, {"type": "text", "text": QUESTIONS[2]}])
    chat = ChatDreamr(reasoner=r)
    try:
        alone = (chat.invoke([message]).text, texts(r.invoke(IMAGE, QUESTIONS[0]).steps))
        results = run_together(
            {
                "chat": lambda: chat.invoke([message]).text,
                "invoke": lambda: texts(r.invoke(IMAGE, QUESTIONS[0]).steps),
            },
            ROUNDS,
        )
        assert results == {"chat": [alone[0]] * ROUNDS, "invoke": [alone[1]] * ROUNDS}
        assert_idle(r)
    finally:
        r.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_leaving_a_stream_early_on_another_loop_cancels_and_waits(backend: str) -> None:
    r = make_reasoner(delay=0.01)  # a request takes a while: the break comes mid-request
    try:

        async def first_step_then_leave() -> str:
            async with aclosing(r.astream(IMAGE, QUESTIONS[0])) as steps:
                async for step in steps:
                    return step.text
            raise AssertionError("no step")

        assert anyio.run(first_step_then_leave, backend=backend) == f"read {QUESTIONS[0]}"
        assert_idle(r)  # at once: closing the stream waited for the request's lanes
    finally:
        r.close()


def test_a_cancelled_caller_cancels_its_request_on_the_reasoners_loop() -> None:
    r = make_reasoner(delay=0.01)
    try:

        async def impatient() -> None:
            with anyio.move_on_after(0.05):
                await r.ainvoke(IMAGE, QUESTIONS[0])
                raise AssertionError("the request should have been cancelled")

        anyio.run(impatient, backend="trio")
        assert_idle(r)
    finally:
        r.close()


def test_sync_stream_closed_early_stops_the_request() -> None:
    r = make_reasoner(delay=0.01)
    try:
        with closing(r.stream(IMAGE, QUESTIONS[0])) as steps:
            assert next(steps).text == f"read {QUESTIONS[0]}"
        assert_idle(r)
    finally:
        r.close()


def test_sync_calls_from_the_reasoners_own_loop_are_refused() -> None:
    """``inspect`` runs on the Reasoner's loop: a sync call there would wait for itself."""
    r = make_reasoner()
    seen: list[BaseException] = []

    def inspect(*_: object) -> None:
        try:
            r.invoke(IMAGE, QUESTIONS[0])
        except RuntimeError as e:
            seen.append(e)

    async def run() -> None:
        async for _ in r.astream_events(IMAGE, QUESTIONS[0], inspect=inspect):
            pass

    try:
        anyio.run(run)
        assert len(seen) == 1 and "own event loop" in str(seen[0])
    finally:
        r.close()


def test_a_model_lock_held_on_one_loop_refuses_another_instead_of_hanging() -> None:
    lock = PriorityLock()
    held, done = threading.Event(), threading.Event()

    async def hold() -> None:
        await lock.acquire()
        held.set()
        await anyio.to_thread.run_sync(done.wait)
        lock.release()

    holder = threading.Thread(target=anyio.run, args=(hold,), daemon=True)
    holder.start()
    assert held.wait(10)
    with pytest.raises(RuntimeError, match="used from another"):
        anyio.run(lock.acquire, backend="trio")
    done.set()
    holder.join(10)
    anyio.run(lock.acquire, backend="trio")  # a free lock holds no loop's state: any loop may take it
    assert lock.locked


def test_a_closed_reasoner_starts_a_fresh_loop_on_its_next_call() -> None:
    others = {t for t in threading.enumerate() if t.name == "dreamr-reasoner"}  # other tests' Reasoners
    r = make_reasoner()
    first = texts(r.invoke(IMAGE, QUESTIONS[0]).steps)
    r.close()
    assert not r.loop.running
    assert texts(r.invoke(IMAGE, QUESTIONS[0]).steps) == first
    r.close()
    assert {t for t in threading.enumerate() if t.name == "dreamr-reasoner"} <= others


@pytest.mark.slow
def test_shipped_models_shared_by_sync_async_and_langchain_callers() -> None:
    """One round on the demo models (real decoding, draft in its own process), the core on a trio
    loop and its callers on asyncio, trio and none: as alone."""
    from dreamr_stream.tasks.grid.puzzles import make_puzzle, split_seed

    demo = Reasoner.demo()
    assert demo.draft is not None
    r = Reasoner(demo.target.backend, demo.draft.backend, config=demo.config, loop_backend="trio")
    try:
        puzzles = [make_puzzle(split_seed("test", i)) for i in range(3)]
        asks = [(p.image, p.question.text()) for p in puzzles]
        alone = [texts(r.invoke(*a).steps) for a in asks]
        runnable = ReasonerRunnable(r)

        async def astream() -> list[str]:
            return [s.text async for s in r.astream(*asks[1])]

        results = run_together(
            {
                "invoke": lambda: texts(r.invoke(*asks[0]).steps),
                "astream": lambda: anyio.run(astream),
                "langchain": lambda: texts(runnable.invoke({"image": asks[2][0], "question": asks[2][1]}).steps),
            },
            rounds=1,
        )
        assert results == {"invoke": [alone[0]], "astream": [alone[1]], "langchain": [alone[2]]}
        assert r.active_requests == 0 and r.in_flight == 0
    finally:
        r.close()
        demo.close()
