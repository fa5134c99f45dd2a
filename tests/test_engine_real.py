"""FPSR invariants (DESIGN section 4) on tiny real transformers models, in-process."""

from __future__ import annotations

import math
from contextlib import aclosing

import anyio
import pytest

from dreamr_stream.backends.hf import HFSession, TransformersBackend
from dreamr_stream.config import CacheConfig, GenerationConfig, ReasonerConfig, SchedulingConfig, VerificationConfig
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks.grid.puzzles import make_puzzle

PUZZLE = make_puzzle(7)
IMAGE, QUESTION = PUZZLE.image, PUZZLE.question.text()


def reasoner(
    pair: tuple[TransformersBackend, TransformersBackend], tau: float, fallback: str = "off", mode: str = "judge"
) -> Reasoner:
    config = ReasonerConfig(
        cache=CacheConfig(enabled=False),
        generation=GenerationConfig(max_steps=5, max_step_tokens=6),
        verification=VerificationConfig(tau=tau, mode=mode),  # type: ignore[arg-type]
        scheduling=SchedulingConfig(fallback=fallback, lookahead=2, fallback_chunk_tokens=2),
    )
    return Reasoner(*pair, config=config)


async def texts(r: Reasoner, method: str = "fpsr") -> list[str]:
    return [s.text for s in (await r.ainvoke(IMAGE, QUESTION, method=method)).steps]  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", ["off", "on"])
@pytest.mark.parametrize("mode", ["judge", "likelihood"])
async def test_tau_inf_equals_target_only(tiny_pair, fallback: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    r = reasoner(tiny_pair, math.inf, fallback, mode)
    assert await texts(r) == await texts(r, "target_only") == await texts(r, "sequential")


@pytest.mark.asyncio
async def test_tau_zero_equals_draft_only(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    r = reasoner(tiny_pair, 0.0)
    assert await texts(r) == await texts(r, "draft_only")


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", ["off", "on"])
async def test_target_cache_equals_fresh_forward_after_any_verdicts(tiny_pair, fallback: str) -> None:  # type: ignore[no-untyped-def]
    target, _ = tiny_pair
    decisions: list[bool] = []
    for tau in (0.5, 0.9, 1.0, 1.1, 2.0):
        diffs: list[float] = []

        def check(t: HFSession, d: HFSession, diffs: list[float] = diffs) -> None:
            ref = target.reference_logits(t)[-1]
            diffs.append(float((ref - t.logits_at[t.length]).abs().max()))

        r = reasoner(tiny_pair, tau, fallback)
        result = None
        async for e in r.astream_events(IMAGE, QUESTION, inspect=check):
            if e.type == "finished":
                result = e.result
        assert result is not None and diffs and diffs[0] < 1e-4
        decisions += [s.verdict.accepted for s in result.steps if s.verdict is not None]
        decisions += [False] * sum(s.rejected_draft is not None for s in result.steps)
    assert True in decisions and False in decisions, "the taus should produce both accepts and rejects"


@pytest.mark.asyncio
async def test_deterministic_and_concurrent_requests_equal_alone(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    r = reasoner(tiny_pair, 1.0, "on")
    alone = await texts(r)
    assert await texts(r) == alone
    other = make_puzzle(8)
    other_alone = [s.text for s in (await r.ainvoke(other.image, other.question.text())).steps]
    got: dict[str, list[str]] = {}

    async def run(name: str, image, question: str) -> None:  # type: ignore[no-untyped-def]
        got[name] = [s.text for s in (await r.ainvoke(image, question)).steps]

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a", IMAGE, QUESTION)
        tg.start_soon(run, "b", other.image, other.question.text())
        tg.start_soon(run, "c", IMAGE, QUESTION)
    assert got == {"a": alone, "b": other_alone, "c": alone}


@pytest.mark.asyncio
async def test_break_leaves_no_model_call_running(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    r = reasoner(tiny_pair, 1.0, "on")
    async with aclosing(r.astream(IMAGE, QUESTION)) as stream:
        async for _ in stream:
            break
    assert r.active_requests == 0 and r.in_flight == 0
