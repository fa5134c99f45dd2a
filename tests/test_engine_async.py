"""The engine over an ``AsyncModelBackend`` (a served model), on the async scripted fake: the
same results as over a blocking backend, concurrent calls, repaired steps, a failing draft, the
load-aware switch. Fast, no torch; the real thing is ``test_vllm.py``."""

from __future__ import annotations

import math
from contextlib import aclosing

import anyio
import pytest
from PIL import Image

from dreamr_stream.backends.fake import AsyncScriptedBackend, ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, SchedulingConfig, VerificationConfig
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.types import ReasoningResult, StepSource

TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]
DRAFT = ["read row one", "read row 2 wrongly", "count them up", "Answer: 4"]
IMAGE = Image.new("RGB", (32, 32), (10, 200, 10))


def config(tau: float = 1.0, *, max_speculating: int | str | None = "auto") -> ReasonerConfig:
    return ReasonerConfig(
        cache=CacheConfig(enabled=False),
        verification=VerificationConfig(tau=tau),
        scheduling=SchedulingConfig(fallback="off", max_speculating=max_speculating),  # type: ignore[arg-type]
    )


def served(tau: float = 1.0, *, delay: float = 0.0, draft_fails_at: int | None = None, **kw: object) -> Reasoner:
    target = AsyncScriptedBackend(TARGET, name="target", token_delay_s=delay)
    draft = ScriptedBackend(DRAFT, name="draft", fail_at_call=draft_fails_at)
    return Reasoner(target, draft, config=config(tau, **kw))  # type: ignore[arg-type]


def steps(result: ReasoningResult) -> list[str]:
    return [s.text for s in result.steps]


@pytest.mark.asyncio
async def test_served_target_gives_the_same_steps_as_a_blocking_one() -> None:
    blocking = Reasoner(ScriptedBackend(TARGET, name="target"), ScriptedBackend(DRAFT, name="draft"), config=config())
    a = await served().ainvoke(IMAGE, "q")
    b = await blocking.ainvoke(IMAGE, "q")
    assert steps(a) == steps(b) == TARGET
    assert [s.source for s in a.steps] == [s.source for s in b.steps]
    assert served().target.concurrent and not blocking.target.concurrent


@pytest.mark.asyncio
async def test_rejected_step_is_repaired_from_its_agreed_start() -> None:
    result = await served().ainvoke(IMAGE, "q")
    repaired = result.steps[1]
    assert repaired.source is StepSource.TARGET and repaired.rejected_draft == DRAFT[1]
    assert repaired.kept == "read row " and repaired.text == TARGET[1]
    assert result.stats.steps_repaired == 1


@pytest.mark.asyncio
async def test_tau_inf_over_a_served_target_is_target_only() -> None:
    r = served(math.inf)
    result = await r.ainvoke(IMAGE, "q")
    alone = await r.ainvoke(IMAGE, "q", method="target_only")
    assert steps(result) == steps(alone) == TARGET
    assert result.stats.draft_steps_accepted == 0
    assert result.stats.steps_repaired == len(TARGET)  # every draft step started as the target's
    assert all(s.kept is not None and s.text.startswith(s.kept) for s in result.steps)


@pytest.mark.asyncio
async def test_calls_of_concurrent_requests_overlap_on_a_served_model() -> None:
    r = served(math.inf, delay=0.01, max_speculating=None)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(r.ainvoke, IMAGE, "q")
    target = r.target.backend
    assert isinstance(target, AsyncScriptedBackend) and target.peak_active >= 2
    assert r.in_flight == 0 and target.active == 0


@pytest.mark.asyncio
async def test_leaving_early_cancels_the_served_call() -> None:
    r = served(math.inf, delay=0.05)
    target = r.target.backend
    assert isinstance(target, AsyncScriptedBackend)
    with anyio.fail_after(5):
        async with aclosing(r.astream(IMAGE, "q")) as stream:
            async for _ in stream:
                break
    assert target.active == 0 and r.in_flight == 0 and r.active_requests == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("fails_at", [1, 2, 4, 7])
async def test_a_failing_draft_leaves_the_target_to_finish(fails_at: int) -> None:
    r = served(draft_fails_at=fails_at)
    result = await r.ainvoke(IMAGE, "q")
    assert steps(result) == TARGET
    assert result.stats.target_alone_from is not None
    assert (result.stats.target_alone_reason or "").startswith("draft failed: draft: injected failure")
    assert result.steps[-1].is_final


@pytest.mark.asyncio
async def test_load_aware_switch_sends_requests_beyond_the_limit_to_the_target_alone() -> None:
    r = served(delay=0.005, max_speculating=1)
    results: list[ReasoningResult] = []

    async def one() -> None:
        results.append(await r.ainvoke(IMAGE, "q"))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    alone = [x for x in results if x.stats.target_alone_from == 0]
    assert all((x.stats.target_alone_reason or "").startswith("load: ") for x in alone)
    assert len(alone) >= 2 and all(steps(x) == TARGET for x in results)
    assert all(x.stats.draft_steps_judged == 0 for x in alone)
    # alone, a request speculates; 'auto' is a limit only for a served target
    assert (await r.ainvoke(IMAGE, "q")).stats.target_alone_from is None
    assert served()._speculation_limit(config()) == 2
    blocking = Reasoner(ScriptedBackend(TARGET), ScriptedBackend(DRAFT), config=config())
    assert blocking._speculation_limit(config()) is None
