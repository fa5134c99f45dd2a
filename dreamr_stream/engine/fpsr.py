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

The draft is an optimisation, not a dependency: when one of its calls fails (its process died,
its server errors), the request goes on with the target alone from the verified prefix, says
so once in a warning and in its stats (``target_alone_from``, ``target_alone_reason``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from dreamr_stream.backends.base import ScoreOutput, Session
from dreamr_stream.engine.repair import TargetStep, can_repair, write_target_step
from dreamr_stream.engine.request import RequestContext, step_cost
from dreamr_stream.engine.runner import ModelRunner, Priority
from dreamr_stream.errors import BackendError
from dreamr_stream.events import CacheHitEvent, DraftedEvent, RejectedEvent
from dreamr_stream.store import Trajectory, image_png
from dreamr_stream.types import StepCost, StepSource

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
    cost: StepCost = field(default_factory=StepCost)
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
                self.text, self.eos, self.cost = out.text, out.eos, step_cost(out)
        except Exception as e:  # handed to the verification lane, which raises it
            self.failure = e
        finally:
            self.finished.set()

    def cancel(self) -> None:
        self.scope.cancel()


def _draft_failed(ctx: RequestContext, e: BackendError) -> None:
    log.warning("the draft failed; the target goes on alone: %s", e)
    ctx.go_alone(f"draft failed: {e}")


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
    async with send:  # closing it tells the verification lane that no more drafts come
        try:
            for index in range(start, ctx.config.generation.max_steps):
                await permits.acquire()
                bounds.append(draft_session.length)
                out = await ctx.write_step(draft, draft_session, index=index, lane="draft")
                await ctx.emit(DraftedEvent(index=index, text=out.text, elapsed_s=ctx.now()))
                await send.send(_Draft(index, out.text, out.eos))
                if ctx.is_final(out.text, out.eos):
                    return
        except BackendError as e:
            _draft_failed(ctx, e)


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
                self.target.close(fb.session)
                fb.session = None
        self.fallbacks.clear()

    async def _start_fallback(self, tg: TaskGroup, index: int) -> _Fallback | None:
        c = self.ctx.counts
        if index >= self.ctx.config.generation.max_steps or not fallback_enabled(
            self.ctx.config.scheduling.fallback, on_gpu=self.on_gpu, judged=c["judged"], accepted=c["accepted"]
        ):
            return None
        # fork in the verification lane, before anything else touches T
        fork = await self.target.fork(self.T, priority=Priority.FALLBACK)
        fb = _Fallback(index, session=fork)
        self.fallbacks.append(fb)  # owned by the epoch: closed there unless adopted
        tg.start_soon(fb.run, self.ctx, fork)
        return fb

    def _drop(self, fb: _Fallback | None) -> None:
        if fb is not None:
            fb.cancel()

    async def _target_step(
        self, fb: _Fallback | None, index: int, rejected: str = "", score: ScoreOutput | None = None
    ) -> TargetStep:
        """The target's own step ``index``: from a finished fallback; else repaired from the
        rejected draft (``engine.repair``) when it can be; else from the fallback lane; else
        written on ``T``."""
        if fb is not None and (fb.finished.is_set() or not can_repair(self.ctx, self.target, score)):
            fb.priority = Priority.VERIFY  # now on the critical path
            await fb.finished.wait()
            if fb.failure is not None:
                raise fb.failure
            assert fb.session is not None
            old, self.T = self.T, fb.session
            fb.session = None
            self.target.close(old)
            return TargetStep(fb.text, fb.eos, None, fb.cost)
        self._drop(fb)
        return await write_target_step(self.ctx, self.target, self.T, index=index, rejected=rejected, score=score)

    async def epoch(self) -> None:
        ctx = self.ctx
        start = len(ctx.steps)
        bounds: list[int] = []  # D's length before each step drafted in this epoch
        try:
            resync = await self._lanes(start, bounds)
        finally:
            self.close_fallbacks()
        if resync is not None and not ctx.done() and not ctx.alone:
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
                    own = await self._target_step(fb, d.index, d.text, score)
                    fb = None
                    await ctx.accept(
                        own.text, StepSource.TARGET, eos=own.eos, rejected_draft=d.text, kept=own.kept, cost=own.cost
                    )
                    resync = own.text
                    break
                else:
                    # the draft lane ended without a final verified step: the target writes one
                    if not ctx.done():
                        own = await self._target_step(fb, len(ctx.steps))
                        fb = None
                        await ctx.accept(own.text, StepSource.TARGET, eos=own.eos, cost=own.cost)
                        resync = own.text
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
                await self.target.append(self.T, text, stop=stop)
                ctx.count(self.target, 1)
                await ctx.accept(text, StepSource.CACHE)
            else:
                verdict, score = await ctx.judge(self.T, text, index, source=StepSource.CACHE)
                if not verdict.accepted:
                    await ctx.emit(RejectedEvent(index=index, text=text, verdict=verdict, elapsed_s=ctx.now()))
                    await self.target.rollback(self.T, score.n_tokens)
                    break
                await ctx.accept(text, StepSource.CACHE, verdict=verdict)
            adopted.append(text)
        try:
            for text in adopted if not ctx.done() else []:  # the draft continues from the verified prefix
                await draft.append(self.D, text, stop=stop)
                ctx.count(draft, 1)
        except BackendError as e:
            _draft_failed(ctx, e)

    async def _resync_draft(self, text: str, bounds: list[int]) -> None:
        """Roll ``D`` back to the verified boundary and append the target's step."""
        ctx, draft = self.ctx, self.ctx.draft
        assert draft is not None
        drop = self.D.length - bounds[0] if bounds else 0
        try:
            if drop:
                await draft.rollback(self.D, drop)
            async with ctx.span("draft", "resync", len(ctx.steps) - 1):
                n = await draft.append(self.D, text, stop=ctx.config.generation.step_delimiter)
        except BackendError as e:
            _draft_failed(ctx, e)
            return
        ctx.count(draft, 1, n)


async def run_fpsr(ctx: RequestContext, image: Any, *, inspect: Inspect | None = None) -> None:
    """Run FPSR for one request; steps and events go out through ``ctx``."""
    target, draft = ctx.target, ctx.draft
    assert target is not None and draft is not None
    sessions: dict[str, Session] = {}

    async def open_target() -> None:
        sessions["target"] = await ctx.open(target, image)

    async def open_draft() -> None:
        try:
            sessions["draft"] = await ctx.open(draft, image)
        except BackendError as e:
            _draft_failed(ctx, e)

    try:
        async with anyio.create_task_group() as tg:  # prefill both models at once
            tg.start_soon(open_target)
            if not ctx.alone:  # the load-aware switch may have sent this request to the target alone
                tg.start_soon(open_draft)
        if "draft" not in sessions:  # the target alone; what it writes is cached all the same
            await ctx.target_alone(sessions["target"])
        else:
            await _speculate(ctx, sessions, inspect)
    finally:
        for name, runner in (("target", target), ("draft", draft)):
            if name in sessions:
                with contextlib.suppress(BackendError):
                    runner.close(sessions[name])
        if ctx.cache is not None and ctx.cache.entries:
            with anyio.CancelScope(shield=True):  # a cancelled request still logs what it verified
                await ctx.cache.store.append_log(ctx.cache.entries, timeout_s=ctx.cache.timeout_s)
            ctx.cache.entries = []
    await _store_trajectory(ctx)


async def _speculate(ctx: RequestContext, sessions: dict[str, Session], inspect: Inspect | None) -> None:
    """FPSR proper, on the opened sessions (which it takes over): cached drafts, then epochs."""
    target, draft = ctx.target, ctx.draft
    assert target is not None and draft is not None
    run = _FPSR(ctx, sessions.pop("target"), sessions.pop("draft"))
    try:
        if ctx.cache is not None:
            hit = await ctx.cache.store.get(ctx.cache.key, timeout_s=ctx.cache.timeout_s)
            if hit is not None:
                await ctx.emit(CacheHitEvent(steps=len(hit.steps), elapsed_s=ctx.now()))
                await run.replay(list(hit.steps))
        while not ctx.done():
            if ctx.alone:
                await ctx.target_alone(run.T)
            else:
                await run.epoch()
        if inspect is not None:
            inspect(run.T, run.D)
    finally:
        target.close(run.T)  # T may be an adopted fallback fork by now
        with contextlib.suppress(BackendError):  # a failed draft may fail to free, too
            draft.close(run.D)


async def _store_trajectory(ctx: RequestContext) -> None:
    """Keep a finished trajectory (its last step final) for the next identical request."""
    cache = ctx.cache
    if cache is None or not ctx.steps or not ctx.steps[-1].is_final:
        return
    png = await anyio.to_thread.run_sync(image_png, cache.pil)
    trajectory = Trajectory(steps=[s.text for s in ctx.steps], image=cache.image, question=ctx.question)
    await cache.store.put(cache.key, trajectory, png, timeout_s=cache.timeout_s)
