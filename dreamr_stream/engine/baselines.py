"""Baselines that share FPSR's backends and bookkeeping.

* ``target_only``: the target writes every step (the accuracy and speed reference);
* ``draft_only``: the draft writes every step, unverified;
* ``sequential``: speculative reasoning with no overlap: draft one step, judge it with the
  same TBVM, on rejection let the target write the step; with ``scheduling.repair=False`` it
  rewrites the whole step (SpecReason's schedule, the peer ``dreamr bench`` compares with), by
  default it repairs the step as FPSR does (``engine.repair``).
"""

from __future__ import annotations

from typing import Any

from dreamr_stream.backends.base import Session
from dreamr_stream.engine import calls
from dreamr_stream.engine.repair import write_target_step
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.events import DraftedEvent, RejectedEvent
from dreamr_stream.types import StepSource

__all__ = ["run_draft_only", "run_sequential", "run_target_only"]


async def _solo(ctx: RequestContext, runner: ModelRunner, image: Any, source: StepSource) -> None:
    session = await calls.open_session(ctx, runner, image)
    try:
        await calls.write_alone(ctx, runner, session, source)
    finally:
        runner.close(session)


async def run_target_only(ctx: RequestContext, image: Any) -> None:
    assert ctx.target is not None
    await _solo(ctx, ctx.target, image, StepSource.TARGET)


async def run_draft_only(ctx: RequestContext, image: Any) -> None:
    assert ctx.draft is not None
    await _solo(ctx, ctx.draft, image, StepSource.DRAFT)


async def run_sequential(ctx: RequestContext, image: Any) -> None:
    target, draft = ctx.target, ctx.draft
    assert target is not None and draft is not None
    delimiter = ctx.config.generation.step_delimiter
    sessions: list[Session] = []
    try:
        T = await calls.open_session(ctx, target, image)
        sessions.append(T)
        D = await calls.open_session(ctx, draft, image)
        sessions.append(D)
        while not ctx.done():
            index = len(ctx.steps)
            before = D.length
            out = await calls.write_step(ctx, draft, D, index=index, lane="draft")
            await ctx.emit(DraftedEvent(index=index, text=out.text, elapsed_s=ctx.now()))
            score = None
            if out.text.strip():
                verdict, score = await calls.judge(ctx, T, out.text, index)
                if verdict.accepted:
                    await ctx.accept(out.text, StepSource.DRAFT, eos=out.eos, verdict=verdict)
                    continue
                await ctx.emit(RejectedEvent(index=index, text=out.text, verdict=verdict, elapsed_s=ctx.now()))
            own = await write_target_step(ctx, target, T, index=index, rejected=out.text, score=score)
            await ctx.accept(
                own.text, StepSource.TARGET, eos=own.eos, rejected_draft=out.text, kept=own.kept, cost=own.cost
            )
            if not ctx.done():
                await draft.rollback(D, D.length - before)
                await draft.append(D, own.text, stop=delimiter)
    finally:
        for runner, session in zip((target, draft), sessions, strict=False):
            runner.close(session)
