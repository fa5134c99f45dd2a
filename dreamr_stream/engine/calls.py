"""The model calls one request makes, each inside its timeline span and counted on its
``RequestContext``: prefill, a whole step in short calls, a verdict, a model writing alone."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from dreamr_stream.backends.base import ScoreOutput, Session, StepOutput
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.types import Step, StepCost, StepSource, Verdict

__all__ = ["DRAFT_CHUNK_TOKENS", "judge", "open_session", "step_cost", "write_alone", "write_own", "write_step"]

DRAFT_CHUNK_TOKENS = 8  # tokens per model call: bounds how long a cancelled lane lingers


def step_cost(out: StepOutput, *, kept_tokens: int = 0, extra_forwards: int = 0) -> StepCost:
    """A written step's cost from its ``write_step`` output (plus a begun step's kept tokens)."""
    return StepCost(
        kept_tokens=kept_tokens,
        proposed_tokens=out.proposed,
        written_tokens=out.new_tokens - out.proposed,
        target_forwards=out.forwards + extra_forwards,
    )


async def open_session(ctx: RequestContext, runner: ModelRunner, image: Any, priority: int = 0) -> Session:
    async with ctx.span(runner.name, "prefill", 0):
        session = await runner.open_session(image, ctx.question, seed=ctx.config.generation.seed, priority=priority)
    ctx.count(runner, 1)
    return session


async def write_step(
    ctx: RequestContext,
    runner: ModelRunner,
    session: Session,
    *,
    index: int,
    lane: str,
    priority: int | Callable[[], int] = 0,
    chunk: int | None = None,
) -> StepOutput:
    """Decode one whole step in short calls (so cancellation is prompt); the output counts
    the tokens and forwards of all of them.

    ``priority`` may be a callable, read before every call: a speculative fallback step
    is raised to verification's priority once the engine waits on it.
    """
    gen = ctx.config.generation
    budget = chunk or DRAFT_CHUNK_TOKENS
    new = forwards = proposed = 0
    async with ctx.span(lane, "write", index):
        while True:
            out = await runner.generate_step(
                session,
                max_tokens=gen.max_step_tokens,
                stop=gen.step_delimiter,
                temperature=gen.temperature,
                budget=budget,
                priority=priority() if callable(priority) else priority,
            )
            ctx.count(runner, out.forwards, out.new_tokens)
            new, forwards, proposed = new + out.new_tokens, forwards + out.forwards, proposed + out.proposed
            if out.done:  # the whole step's counts, over all its calls
                return StepOutput(out.text, True, out.eos, new, forwards, proposed)


async def judge(
    ctx: RequestContext, session: Session, text: str, index: int, *, source: StepSource = StepSource.DRAFT
) -> tuple[Verdict, ScoreOutput]:
    """Score ``text`` as step ``index`` on the target's ``session`` (its tokens stay there) and
    let TBVM decide."""
    target, verifier = ctx.target, ctx.verifier
    assert target is not None and verifier is not None
    template: JudgeTemplate | None = None
    if verifier.needs_judge:
        template = ctx.config.verification.judge or target.backend.judge
    async with ctx.span("verify", "judge", index):
        score = await target.score(session, text, stop=ctx.config.generation.step_delimiter, judge=template)
    ctx.count(target, score.forwards)
    verdict = verifier.verify(score.p_pos, score.p_neg, score.token_logprobs)
    ctx.record_verdict(verdict, index=index, text=text, source=source)
    return verdict, score


async def write_own(ctx: RequestContext, runner: ModelRunner, session: Session, source: StepSource) -> Step:
    """One step written by one model alone on ``session``, verified as it is (a target's step
    with its cost)."""
    out = await write_step(ctx, runner, session, index=len(ctx.steps), lane=runner.name)
    return await _accept_own(ctx, out, source)


async def _accept_own(ctx: RequestContext, out: StepOutput, source: StepSource) -> Step:
    """A step one model wrote alone, verified as it is (a target's step with its cost)."""
    cost = step_cost(out) if source is StepSource.TARGET else None
    return await ctx.accept(out.text, source, eos=out.eos, cost=cost)


async def write_alone(ctx: RequestContext, runner: ModelRunner, session: Session, source: StepSource) -> int:
    """Write the remaining steps with one model alone on ``session`` (the single-model
    baselines, and FPSR once a request goes alone); returns how many. A backend that writes
    the rest in one call (``Capabilities.streams_rest``: a served model) is asked once, so
    that the request costs its server what one plain request costs; any other writes one
    step per call."""
    written = 0
    while not ctx.done():
        if runner.streams_rest:
            written += await _write_rest(ctx, runner, session, source)
        else:
            await write_own(ctx, runner, session, source)
            written += 1
    return written


async def _write_rest(ctx: RequestContext, runner: ModelRunner, session: Session, source: StepSource) -> int:
    """The steps of one ``generate_rest`` call, each accepted as it arrives (its span runs from
    the previous step's arrival); stops the call once the request is done."""
    gen = ctx.config.generation
    written = 0
    start = ctx.now()
    rest = runner.generate_rest(
        session,
        max_tokens=gen.max_step_tokens,
        stop=gen.step_delimiter,
        max_steps=gen.max_steps - len(ctx.steps),
        temperature=gen.temperature,
    )
    async with aclosing(rest) as steps:
        async for out in steps:
            ctx.record_span(runner.name, "write", len(ctx.steps), start)
            ctx.count(runner, out.forwards, out.new_tokens)
            await _accept_own(ctx, out, source)
            written += 1
            start = ctx.now()
            if ctx.done():
                break
    return written
