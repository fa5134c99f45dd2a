"""FPSR engine invariants and lifecycle on the scripted fake backend (fast, no torch)."""

from __future__ import annotations

import gc
import math
from contextlib import aclosing

import anyio
import pytest
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, SchedulingConfig, VerificationConfig
from dreamr_stream.errors import BackendError
from dreamr_stream.events import DraftedEvent, FailedEvent, FinishedEvent, RejectedEvent, VerifiedEvent
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.types import StepSource

NO_CACHE = CacheConfig(enabled=False)  # invariants are about the lanes; the cache has its own tests
TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]
DRAFT = ["read row one", "read row 2 wrongly", "count them up", "Answer: 4"]
IMAGE = Image.new("RGB", (32, 32), (200, 10, 10))


def make(tau: float = 1.0, *, delay: float = 0.0, fallback: str = "off", lookahead: int = 2, **target_kw) -> Reasoner:
    config = ReasonerConfig(
        cache=NO_CACHE,
        verification=VerificationConfig(tau=tau),
        scheduling=SchedulingConfig(fallback=fallback, lookahead=lookahead, fallback_chunk_tokens=1),
    )
    target = ScriptedBackend(TARGET, name="target", token_delay_s=delay, **target_kw)
    draft = ScriptedBackend(DRAFT, name="draft", token_delay_s=delay / 4)
    return Reasoner(target, draft, config=config)


def backends(r: Reasoner) -> list[ScriptedBackend]:
    assert r.draft is not None
    return [r.target.backend, r.draft.backend]  # type: ignore[list-item]


def assert_idle(r: Reasoner) -> None:
    assert r.active_requests == 0
    assert r.in_flight == 0
    for b in backends(r):
        assert b.active_calls == 0, f"{b.name} still has a model call running"
        assert b.open_sessions == 0, f"{b.name} leaked {b.open_sessions} sessions"


async def texts(r: Reasoner, method: str = "fpsr") -> list[str]:
    return [s.text async for s in r.astream(IMAGE, "how many?", method=method)]  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", ["off", "on"])
async def test_tau_inf_is_target_only(fallback: str) -> None:
    r = make(math.inf, fallback=fallback)
    steps = [s async for s in r.astream(IMAGE, "how many?")]
    assert [s.text for s in steps] == TARGET == await texts(r, "target_only")
    assert all(s.source is StepSource.TARGET for s in steps)
    assert_idle(r)


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", ["off", "on"])
async def test_tau_zero_is_draft_only(fallback: str) -> None:
    r = make(0.0, fallback=fallback)
    assert await texts(r) == DRAFT == await texts(r, "draft_only")
    assert_idle(r)


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", ["off", "on"])
@pytest.mark.parametrize("lookahead", [1, 2, 4])
async def test_rejection_rolls_back_and_resyncs(fallback: str, lookahead: int) -> None:
    r = make(fallback=fallback, lookahead=lookahead, delay=0.001)
    result = await r.ainvoke(IMAGE, "how many?")
    assert [s.text for s in result.steps] == TARGET
    assert [s.source for s in result.steps] == [StepSource.DRAFT, StepSource.TARGET, StepSource.DRAFT, StepSource.DRAFT]
    assert result.steps[1].rejected_draft == DRAFT[1]
    assert result.stats.draft_steps_judged == 4 and result.stats.draft_steps_accepted == 3
    assert result.stats.acceptance_rate == pytest.approx(0.75)
    assert result.answer == "4"
    assert result.steps[-1].is_final
    assert_idle(r)


@pytest.mark.asyncio
async def test_sequential_baseline_matches_fpsr() -> None:
    r = make()
    assert await texts(r, "sequential") == await texts(r) == TARGET
    assert_idle(r)


@pytest.mark.asyncio
async def test_events_cover_drafts_rejections_and_finish() -> None:
    r = make()
    events = [e async for e in r.astream_events(IMAGE, "how many?")]
    kinds = [e.type for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert any(isinstance(e, RejectedEvent) and e.text == DRAFT[1] for e in events)
    assert sum(isinstance(e, VerifiedEvent) for e in events) == 3
    drafted = [e for e in events if isinstance(e, DraftedEvent)]
    assert [d.text for d in drafted[:2]] == DRAFT[:2]
    assert isinstance(events[-1], FinishedEvent)


@pytest.mark.asyncio
@pytest.mark.parametrize("lookahead", [1, 2, 3])
async def test_draft_stays_within_lookahead(lookahead: int) -> None:
    target = [f"step {i}" for i in range(8)] + ["Answer: 1"]
    config = ReasonerConfig(cache=NO_CACHE, scheduling=SchedulingConfig(lookahead=lookahead, fallback="off"))
    r = Reasoner(ScriptedBackend(target, token_delay_s=0.002), ScriptedBackend(target), config=config)
    verified = 0
    async for e in r.astream_events(IMAGE, "q"):
        if isinstance(e, DraftedEvent):
            assert e.index - verified < lookahead, "draft ran further ahead than lookahead allows"
        if isinstance(e, VerifiedEvent):
            verified += 1
    assert verified == len(target)


@pytest.mark.asyncio
async def test_greedy_runs_are_deterministic() -> None:
    r = make(delay=0.001, fallback="on")
    first = await r.ainvoke(IMAGE, "how many?")
    second = await r.ainvoke(IMAGE, "how many?")
    assert [s.model_dump(exclude={"elapsed_s"}) for s in first.steps] == [
        s.model_dump(exclude={"elapsed_s"}) for s in second.steps
    ]


@pytest.mark.asyncio
async def test_concurrent_requests_equal_each_alone() -> None:
    r = make(delay=0.001, fallback="on")
    alone = await texts(r)
    results: list[list[str]] = [[], [], []]

    async def one(i: int) -> None:
        results[i] = await texts(r)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    assert results == [alone] * 3
    assert_idle(r)


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", ["off", "on"])
async def test_break_after_first_step_stops_everything(fallback: str) -> None:
    r = make(delay=0.005, fallback=fallback)
    async with aclosing(r.astream(IMAGE, "how many?")) as stream:
        async for step in stream:
            assert step.index == 0
            break
    assert_idle(r)


@pytest.mark.asyncio
async def test_plain_break_is_cleaned_up_when_the_generator_is_dropped() -> None:
    r = make(delay=0.005, fallback="on")
    async for _ in r.astream(IMAGE, "how many?"):
        break
    gc.collect()
    with anyio.fail_after(5):
        while r.active_requests:  # noqa: ASYNC110 - asyncio closes a dropped generator in a task of its own
            await anyio.sleep(0.005)
    assert_idle(r)


@pytest.mark.asyncio
async def test_cancelling_the_consumer_stops_everything() -> None:
    r = make(delay=0.01, fallback="on")
    seen = []
    with anyio.move_on_after(0.05):
        async for step in r.astream(IMAGE, "how many?"):
            seen.append(step)
    assert len(seen) < len(TARGET)
    assert_idle(r)


@pytest.mark.asyncio
@pytest.mark.parametrize("fail_at", [1, 3, 6])
async def test_model_error_ends_stream_with_typed_error(fail_at: int) -> None:
    r = make(fail_at_call=fail_at, fallback="on")
    with pytest.raises(BackendError, match="injected failure"):
        async for _ in r.astream(IMAGE, "how many?"):
            pass
    assert_idle(r)
    r2 = make(fail_at_call=fail_at)
    events = [e async for e in r2.astream_events(IMAGE, "how many?")]
    assert isinstance(events[-1], FailedEvent) and events[-1].error == "BackendError"
    assert_idle(r2)


@pytest.mark.asyncio
async def test_timeline_shows_draft_and_verification_overlapping() -> None:
    target = [f"a longer step number {i} with words" for i in range(5)] + ["Answer: 5"]
    config = ReasonerConfig(cache=NO_CACHE, scheduling=SchedulingConfig(lookahead=2, fallback="off"))
    r = Reasoner(
        ScriptedBackend(target, token_delay_s=0.01), ScriptedBackend(target, token_delay_s=0.004), config=config
    )
    result = await r.ainvoke(IMAGE, "q")
    spans = result.stats.timeline
    drafts = [s for s in spans if s.lane == "draft" and s.what == "write"]
    judges = [s for s in spans if s.lane == "verify"]
    overlap = any(d.start_s < j.end_s and j.start_s < d.end_s for d in drafts for j in judges)
    assert overlap, "the draft should write step k+1 while step k is verified"
    assert result.stats.wall_s > 0 and result.stats.time_to_first_step_s is not None


@pytest.mark.asyncio
async def test_likelihood_mode_needs_no_judge() -> None:
    config = ReasonerConfig(cache=NO_CACHE, verification=VerificationConfig(mode="likelihood", tau=1.0))
    r = Reasoner(ScriptedBackend(TARGET), ScriptedBackend(DRAFT), config=config)
    result = await r.ainvoke(IMAGE, "how many?")
    assert [s.text for s in result.steps] == TARGET
    assert all(s.verdict is None or s.verdict.mode == "likelihood" for s in result.steps)


def test_sync_invoke_works_inside_and_outside_a_loop() -> None:
    r = make()
    assert [s.text for s in r.invoke(IMAGE, "how many?").steps] == TARGET

    async def inside() -> list[str]:
        return [s.text for s in r.invoke(IMAGE, "how many?").steps]

    assert anyio.run(inside) == TARGET


def test_concurrent_sync_invokes_from_many_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    r = make(delay=0.001)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: r.invoke(IMAGE, "how many?"), range(8)))
    assert all([s.text for s in res.steps] == TARGET for res in results)
    assert_idle(r)


def test_call_model_runs_on_the_reasoners_model_threads_behind_its_lock() -> None:
    import threading

    from dreamr_stream.errors import ConfigError

    r = make()
    ran: list[tuple[str, bool]] = []

    def probe(x: int) -> int:
        ran.append((threading.current_thread().name, r.target.lock.locked))
        return x * 2

    assert r.call_model(probe, 21) == 42
    ((thread, locked),) = ran
    assert thread != threading.main_thread().name and locked  # a worker thread, holding the model's lock
    assert r.call_model(probe, 1, model="draft") == 2
    no_draft = Reasoner(ScriptedBackend(TARGET, name="target"), None)
    with pytest.raises(ConfigError):
        no_draft.call_model(probe, 1, model="draft")
    assert_idle(r)
