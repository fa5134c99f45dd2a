"""FPSR: fully parallel speculative reasoning, gated by TBVM.

One request runs in *epochs*. An epoch starts from the verified prefix (k steps) with the
target session ``T`` and the draft session ``D`` both holding exactly those steps, and runs
three lanes at once:

* draft lane: writes steps k, k+1, ... on ``D``, at most ``lookahead`` steps ahead of the
  last verified one (a semaphore), and hands each to the verification lane in order;
* verification lane (this coroutine): scores each drafted step on ``T`` in one forward
  (candidate + judge suffix); TBVM decides. Accept: the step is yielded and its tokens stay
  in ``T`` (the suffix is already rolled back). Reject: the epoch ends;
* target lane (the fallback): writes the target's own step k on a fork of ``T``, at lower
  priority than verification, so that a rejection costs only what is left of that step.

On a reject the target's step is yielded (from the fallback when it ran, else written on
``T`` after rolling back the candidate), the draft lane is cancelled and awaited, ``D`` is
rolled back to the verified boundary and the target's step is appended to it; the next
epoch begins. Greedy decisions do not depend on timing, so results are deterministic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from dreamr_stream.backends.base import Session
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.runner import ModelRunner, Priority
from dreamr_stream.events import CacheHitEvent, DraftedEvent, RejectedEvent
from dreamr_stream.store import Trajectory, image_png
from dreamr_stream.types import StepSource

__all__ = ["fallback_enabled", "run_fpsr"]

log = logging.getLogger(__name__)
Inspect = Callable[[Session, Session], None]


@dataclass(frozen=True)
class _Draft:
    index: int
    text: str
    eos: bool


def fallback_enabled(mode: str, *, on_gpu: bool, judged: int, accepted: int) -> bool:
    """``auto``: on a GPU always (lanes truly overlap); on a CPU only while this request's
    drafts are mostly rejected (>= 2 judged, acceptance < 50%), since there a speculative
    target step competes with the draft for the same cores."""
    if mode != "auto":
        return mode == "on"
    if on_gpu:
        return True
    return judged >= 2 and accepted / judged < 0.5


@dataclass
class _Fallback:
    """The target writing its own step ``index`` on a fork of ``T``."""

    index: int
    session: Session | None = None
    text: str = ""
    eos: bool = False
    priority: int = Priority.FALLBACK
    finished: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    failure: BaseException | None = None

    async def run(self, ctx: RequestContext, fork: Session) -> None:
        target = ctx.target
        assert target is not None
        self.session = fork
        try:
            with self.scope:
                out = await ctx.write_step(
                    target,
                    fork,
                    index=self.index,
                    lane="target",
                    priority=lambda: self.priority,  # raised to verification's once it is awaited
                    chunk=ctx.config.scheduling.fallback_chunk_tokens,
                )
                self.text, self.eos = out.text, out.eos
        except Exception as e:  # handed to the verification lane, which raises it
            self.failure = e
        finally:
            self.finished.set()

    def cancel(self) -> None:
        self.scope.cancel()


async def _draft_lane(
    ctx: RequestContext,
    draft_session: Session,
    send: anyio.abc.ObjectSendStream[_Draft],
    permits: anyio.Semaphore,
    bounds: list[int],
    start: int,
) -> None:
    draft = ctx.draft
    assert draft is not None
    async with send:
        for index in range(start, ctx.config.generation.max_steps):
            await permits.acquire()
            bounds.append(draft_session.length)
            out = await ctx.write_step(draft, draft_session, index=index, lane="draft")
            await ctx.emit(DraftedEvent(index=index, text=out.text, elapsed_s=ctx.now()))
            await send.send(_Draft(index, out.text, out.eos))
            if ctx.is_final(out.text, out.eos):
                return


class _FPSR:
    def __init__(self, ctx: RequestContext, target_session: Session, draft_session: Session) -> None:
        self.ctx = ctx
        self.T = target_session
        self.D = draft_session
        target = ctx.target
        assert target is not None
        self.target: ModelRunner = target
        self.on_gpu = getattr(getattr(target.backend, "device", None), "type", "cpu") == "cuda"
        self.fallbacks: list[_Fallback] = []

    def close_fallbacks(self) -> None:
        """Free every fallback fork not adopted as ``T`` (their tasks have all ended)."""
        for fb in self.fallbacks:
            if fb.session is not None:
                self.target.backend.close(fb.session)
                fb.session = None
        self.fallbacks.clear()

    async def _start_fallback(self, tg: TaskGroup, index: int) -> _Fallback | None:
        c = self.ctx.counts
        if index >= self.ctx.config.generation.max_steps or not fallback_enabled(
            self.ctx.config.scheduling.fallback, on_gpu=self.on_gpu, judged=c["judged"], accepted=c["accepted"]
        ):
            return None
        # fork in the verification lane, before anything else touches T
        fork = await self.target.call(self.target.backend.fork, self.T, priority=Priority.FALLBACK)
        fb = _Fallback(index, session=fork)
        self.fallbacks.append(fb)  # owned by the epoch: closed there unless adopted
        tg.start_soon(fb.run, self.ctx, fork)
        return fb

    def _drop(self, fb: _Fallback | None) -> None:
        if fb is not None:
            fb.cancel()

    async def _target_step(self, fb: _Fallback | None, index: int, reject_tokens: int) -> tuple[str, bool]:
        """The target's own step ``index``: from the fallback lane, else written on ``T``."""
        if fb is not None:
            fb.priority = Priority.VERIFY  # now on the critical path
            await fb.finished.wait()
            if fb.failure is not None:
                raise fb.failure
            assert fb.session is not None
            old, self.T = self.T, fb.session
            fb.session = None
            self.target.backend.close(old)
            return fb.text, fb.eos
        if reject_tokens:
            await self.target.call(self.target.backend.rollback, self.T, reject_tokens)
        out = await self.ctx.write_step(self.target, self.T, index=index, lane="target")
        return out.text, out.eos

    async def epoch(self) -> None:
        ctx = self.ctx
        start = len(ctx.steps)
        bounds: list[int] = []  # D's length before each step drafted in this epoch
        try:
            resync = await self._lanes(start, bounds)
        finally:
            self.close_fallbacks()
        if resync is not None and not ctx.done():
            await self._resync_draft(resync, bounds[len(ctx.steps) - 1 - start :])

    async def _lanes(self, start: int, bounds: list[int]) -> str | None:
        """Run the lanes until a rejection or the end; returns the target step the draft
        must adopt, if any."""
        ctx = self.ctx
        resync: str | None = None
        send, recv = anyio.create_memory_object_stream[_Draft](math.inf)
        permits = anyio.Semaphore(ctx.config.scheduling.lookahead)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_draft_lane, ctx, self.D, send, permits, bounds, start)
            fb = await self._start_fallback(tg, start)
            async with recv:
                async for d in recv:
                    if d.text.strip():
                        verdict, score = await ctx.judge(self.T, d.text, d.index)
                    else:  # an empty draft is no evidence: the target writes this step
                        verdict, score = None, None
                    if verdict is not None and verdict.accepted:
                        self._drop(fb)
                        await ctx.accept(d.text, StepSource.DRAFT, eos=d.eos, verdict=verdict)
                        permits.release()
                        if ctx.done():
                            break
                        fb = await self._start_fallback(tg, d.index + 1)
                        continue
                    if verdict is not None:
                        await ctx.emit(RejectedEvent(index=d.index, text=d.text, verdict=verdict, elapsed_s=ctx.now()))
                    text, eos = await self._target_step(fb, d.index, score.n_tokens if score else 0)
                    fb = None
                    await ctx.accept(text, StepSource.TARGET, eos=eos, rejected_draft=d.text)
                    resync = text
                    break
                else:
                    # the draft lane ended without a final verified step: the target writes one
                    if not ctx.done():
                        text, eos = await self._target_step(fb, len(ctx.steps), 0)
                        fb = None
                        await ctx.accept(text, StepSource.TARGET, eos=eos)
                        resync = text
            self._drop(fb)
            tg.cancel_scope.cancel()  # stop the draft lane; the task group awaits it
        return resync

    async def replay(self, cached: list[str]) -> None:
        """Cached steps as free drafts: TBVM verifies each (one target forward, no decoding),
        or with ``trust`` they are yielded as they are. The first rejection ends the replay and
        the normal lanes take over from the verified prefix."""
        ctx, draft = self.ctx, self.ctx.draft
        assert ctx.cache is not None and draft is not None
        stop = ctx.config.generation.step_delimiter
        adopted: list[str] = []
        for text in cached:
            if ctx.done():
                break
            index = len(ctx.steps)
            if ctx.cache.trust:
                await self.target.call(self.target.backend.append, self.T, text, stop=stop)
                ctx.count(self.target, 1)
                await ctx.accept(text, StepSource.CACHE)
            else:
                verdict, score = await ctx.judge(self.T, text, index, source=StepSource.CACHE)
                if not verdict.accepted:
                    await ctx.emit(RejectedEvent(index=index, text=text, verdict=verdict, elapsed_s=ctx.now()))
                    await self.target.call(self.target.backend.rollback, self.T, score.n_tokens)
                    break
                await ctx.accept(text, StepSource.CACHE, verdict=verdict)
            adopted.append(text)
        if not ctx.done():
            for text in adopted:  # the draft continues from the verified prefix
                await draft.call(draft.backend.append, self.D, text, stop=stop)
                ctx.count(draft, 1)

    async def _resync_draft(self, text: str, bounds: list[int]) -> None:
        """Roll ``D`` back to the verified boundary and append the target's step."""
        ctx, draft = self.ctx, self.ctx.draft
        assert draft is not None
        drop = self.D.length - bounds[0] if bounds else 0
        if drop:
            await draft.call(draft.backend.rollback, self.D, drop)
        async with ctx.span("draft", "resync", len(ctx.steps) - 1):
            n = await draft.call(draft.backend.append, self.D, text, stop=ctx.config.generation.step_delimiter)
        ctx.count(draft, 1, n)


async def run_fpsr(ctx: RequestContext, image: Any, *, inspect: Inspect | None = None) -> None:
    """Run FPSR for one request; steps and events go out through ``ctx``."""
    target, draft = ctx.target, ctx.draft
    assert target is not None and draft is not None
    sessions: dict[str, Session] = {}

    async def open_one(runner: ModelRunner) -> None:
        sessions[runner.name] = await ctx.open(runner, image)

    try:
        async with anyio.create_task_group() as tg:  # prefill both models at once
            tg.start_soon(open_one, target)
            tg.start_soon(open_one, draft)
        run = _FPSR(ctx, sessions.pop(target.name), sessions.pop(draft.name))
        try:
            if ctx.cache is not None:
                hit = await ctx.cache.store.get(ctx.cache.key, timeout_s=ctx.cache.timeout_s)
                if hit is not None:
                    await ctx.emit(CacheHitEvent(steps=len(hit.steps), elapsed_s=ctx.now()))
                    await run.replay(list(hit.steps))
            while not ctx.done():
                await run.epoch()
            if inspect is not None:
                inspect(run.T, run.D)
        finally:
            target.backend.close(run.T)  # T may be an adopted fallback fork by now
            draft.backend.close(run.D)
    finally:
        for name, runner in ((target.name, target), (draft.name, draft)):
            if name in sessions:
                runner.backend.close(sessions[name])
        if ctx.cache is not None and ctx.cache.entries:
            with anyio.CancelScope(shield=True):  # a cancelled request still logs what it verified
                await ctx.cache.store.append_log(ctx.cache.entries, timeout_s=ctx.cache.timeout_s)
            ctx.cache.entries = []
    await _store_trajectory(ctx)


async def _store_trajectory(ctx: RequestContext) -> None:
    """Keep a finished trajectory (its last step final) for the next identical request."""
    cache = ctx.cache
    if cache is None or not ctx.steps or not ctx.steps[-1].is_final:
        return
    png = await anyio.to_thread.run_sync(image_png, cache.pil)
    trajectory = Trajectory(steps=[s.text for s in ctx.steps], image=cache.image, question=ctx.question)
    await cache.store.put(cache.key, trajectory, png, timeout_s=cache.timeout_s)
