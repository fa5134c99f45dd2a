"""FPSR: fully parallel speculative reasoning, gated by TBVM.

One request runs in *epochs*. An epoch starts from the verified prefix (k steps) with the
target session ``T`` and the draft session ``D`` both holding exactly those steps, and runs
three lanes at once:

* draft lane: writes steps k, k+1, ... on ``D``, at most ``lookahead`` steps ahead of the
  last verified one (a semaphore), and hands each to the verification lane in order;
* verification lane (the driver, this module): scores each drafted step on ``T`` in one
  forward (candidate + judge suffix); TBVM decides. Accept: the step is yielded and its tokens
  stay in ``T``. Reject: the target's own step replaces it and the epoch ends;
* target lane (the fallback): writes the target's own step on a fork of ``T``, at lower
  priority than verification, so that a rejection costs only what is left of that step.

What to do when is decided by ``engine.policy.EpochPolicy``, a pure state machine; this module
performs its actions (model calls, tasks, cancel scopes, events, counts) and feeds back what
happened. A rejected step is repaired (``engine.repair``) unless its fallback finished first.
At the end of an epoch the draft lane is cancelled and awaited, ``D`` is rolled back to the
verified boundary and the target's step is appended to it; the next epoch begins. Greedy
decisions do not depend on timing, so results are deterministic.

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
from typing import Any, assert_never

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dreamr_stream.backends.base import ScoreOutput, Session
from dreamr_stream.engine import calls
from dreamr_stream.engine import policy as P
from dreamr_stream.engine.repair import can_repair, write_target_step
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.runner import ModelRunner, Priority
from dreamr_stream.errors import BackendError
from dreamr_stream.events import CacheHitEvent, DraftedEvent, RejectedEvent
from dreamr_stream.store import Trajectory, image_png
from dreamr_stream.types import StepCost, StepSource, Verdict

__all__ = ["run_fpsr"]

log = logging.getLogger(__name__)
Inspect = Callable[[Session, Session], None]


@dataclass(frozen=True)
class _Draft:
    index: int
    text: str
    eos: bool


Lane = MemoryObjectSendStream[P.Observation | _Draft]  # what the lanes tell the driver


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

    async def run(self, ctx: RequestContext, fork: Session, lane: Lane) -> None:
        target = ctx.target
        assert target is not None
        self.session = fork
        try:
            with self.scope:
                out = await calls.write_step(
                    ctx,
                    target,
                    fork,
                    index=self.index,
                    lane="target",
                    priority=lambda: self.priority,  # raised to verification's once it is awaited
                    chunk=ctx.config.scheduling.fallback_chunk_tokens,
                )
                self.text, self.eos, self.cost = out.text, out.eos, calls.step_cost(out)
        except Exception as e:  # handed to the driver, which raises it
            self.failure = e
        finally:
            self.finished.set()
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                lane.send_nowait(P.FallbackDone(self.index))

    def cancel(self) -> None:
        self.scope.cancel()


def _draft_failed(ctx: RequestContext, e: BackendError) -> None:
    log.warning("the draft failed; the target goes on alone: %s", e)
    ctx.go_alone(f"draft failed: {e}")


async def _draft_lane(
    ctx: RequestContext, draft_session: Session, lane: Lane, permits: anyio.Semaphore, bounds: list[int], start: int
) -> None:
    draft = ctx.draft
    assert draft is not None
    try:
        for index in range(start, ctx.config.generation.max_steps):
            await permits.acquire()
            bounds.append(draft_session.length)
            out = await calls.write_step(ctx, draft, draft_session, index=index, lane="draft")
            await ctx.emit(DraftedEvent(index=index, text=out.text, elapsed_s=ctx.now()))
            lane.send_nowait(_Draft(index, out.text, out.eos))
            if ctx.is_final(out.text, out.eos):
                break
    except BackendError as e:
        _draft_failed(ctx, e)
    lane.send_nowait(P.DraftsEnded())  # not reached when cancelled: the epoch has ended then


class _FPSR:
    """The driver: performs one request's epochs as ``EpochPolicy`` decides them."""

    def __init__(self, ctx: RequestContext, target_session: Session, draft_session: Session) -> None:
        self.ctx = ctx
        self.T = target_session
        self.D = draft_session
        target = ctx.target
        assert target is not None
        self.target: ModelRunner = target
        self.on_gpu = target.capabilities.on_gpu
        self.fallbacks: list[_Fallback] = []

    def close_fallbacks(self) -> None:
        """Free every fallback fork not adopted as ``T`` (their tasks have all ended)."""
        for fb in self.fallbacks:
            if fb.session is not None:
                self.target.close(fb.session)
                fb.session = None
        self.fallbacks.clear()

    async def epoch(self) -> None:
        ctx = self.ctx
        start = len(ctx.steps)
        bounds: list[int] = []  # D's length before each step drafted in this epoch
        try:
            resync = await _Epoch(self, start, bounds).run()
        finally:
            self.close_fallbacks()
        if resync is not None and not ctx.done() and not ctx.alone:
            await self._resync_draft(resync, bounds[len(ctx.steps) - 1 - start :])

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
                verdict, score = await calls.judge(ctx, self.T, text, index, source=StepSource.CACHE)
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


class _Epoch:
    """One epoch's lanes and the actions ``EpochPolicy`` asks for, performed in order."""

    def __init__(self, run: _FPSR, start: int, bounds: list[int]) -> None:
        self.fpsr = run
        self.ctx = run.ctx
        self.start = start
        self.bounds = bounds
        self.drafts: dict[int, _Draft] = {}
        self.judged: dict[int, tuple[Verdict, ScoreOutput]] = {}
        self.fallback: _Fallback | None = None
        self.resync: str | None = None
        self.permits = anyio.Semaphore(self.ctx.config.scheduling.lookahead)
        c = self.ctx.counts
        self.policy = P.EpochPolicy(
            start,
            max_steps=self.ctx.config.generation.max_steps,
            fallback=self.ctx.config.scheduling.fallback,
            on_gpu=run.on_gpu,
            judged=c["judged"],
            accepted=c["accepted"],
        )

    async def run(self) -> str | None:
        """Run the lanes until the policy ends the epoch; returns the target step the draft
        must adopt, if any."""
        send, recv = anyio.create_memory_object_stream[P.Observation | _Draft](math.inf)
        async with send, recv, anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(_draft_lane, self.ctx, self.fpsr.D, send, self.permits, self.bounds, self.start)
            await self._drive(send, recv)
            if self.fallback is not None:
                self.fallback.cancel()
            tg.cancel_scope.cancel()  # stop the draft lane; the task group awaits it
        return self.resync

    async def _drive(self, lane: Lane, recv: MemoryObjectReceiveStream[P.Observation | _Draft]) -> None:
        actions = self.policy.begin()
        while True:
            outcome: P.Observation | None = None
            for action in actions:
                done = await self._perform(action, lane)
                if done is not None:
                    assert outcome is None, "the policy asked for two outcomes at once"
                    outcome = done
            if self.policy.ended:
                return
            # what the lanes reported meanwhile comes first: the outcome is decided in that state
            news = [self._observe(m) for m in _drain(recv)]
            if outcome is not None:
                news.append(outcome)
            if not news:
                news = [self._observe(await recv.receive())]
            actions = [a for obs in news for a in self.policy.on(obs)]

    def _observe(self, message: P.Observation | _Draft) -> P.Observation:
        if not isinstance(message, _Draft):
            return message
        self.drafts[message.index] = message
        final = self.ctx.is_final(message.text, message.eos)
        return P.Drafted(message.index, empty=not message.text.strip(), final=final)

    async def _perform(self, action: P.Action, lane: Lane) -> P.Observation | None:
        ctx = self.ctx
        match action:
            case P.Judge(index=i):
                verdict, score = await calls.judge(ctx, self.fpsr.T, self.drafts[i].text, i)
                self.judged[i] = (verdict, score)
                return P.Judged(i, verdict.accepted, can_repair(ctx, self.fpsr.target, score))
            case P.Accept(index=i):
                d, (verdict, _) = self.drafts[i], self.judged[i]
                await ctx.accept(d.text, StepSource.DRAFT, eos=d.eos, verdict=verdict)
                self.permits.release()
            case P.Reject(index=i):
                verdict, _ = self.judged[i]
                await ctx.emit(RejectedEvent(index=i, text=self.drafts[i].text, verdict=verdict, elapsed_s=ctx.now()))
            case P.StartFallback(index=i):
                await self._start_fallback(i, lane)
            case P.DropFallback():
                if self.fallback is not None:
                    self.fallback.cancel()
                    self.fallback = None
            case P.UseFallback(index=i):
                return await self._use_fallback(i)
            case P.WriteTarget(index=i):
                return await self._write_target(i)
            case P.EndEpoch(resync=resync):
                if not resync:
                    self.resync = None
            case _:
                assert_never(action)
        return None

    async def _start_fallback(self, index: int, lane: Lane) -> None:
        # fork in the verification lane, before anything else touches T
        fork = await self.fpsr.target.fork(self.fpsr.T, priority=Priority.FALLBACK)
        fb = _Fallback(index, session=fork)
        self.fpsr.fallbacks.append(fb)  # owned by the epoch: closed there unless adopted
        self.fallback = fb
        self.tg.start_soon(fb.run, self.ctx, fork, lane)

    async def _write_target(self, index: int) -> P.Observation:
        """The target's step on ``T``: a judged candidate (still in ``T``) is rolled back and,
        where the policy found it repairable, repaired (``engine.repair``)."""
        d = self.drafts.get(index)
        scored = self.judged.get(index)
        own = await write_target_step(
            self.ctx,
            self.fpsr.target,
            self.fpsr.T,
            index=index,
            rejected=d.text if d else "",
            score=scored[1] if scored else None,
        )
        rejected = d.text if d else None
        await self.ctx.accept(
            own.text, StepSource.TARGET, eos=own.eos, rejected_draft=rejected, kept=own.kept, cost=own.cost
        )
        self.resync = own.text
        return P.TargetWrote(index, final=self.ctx.is_final(own.text, own.eos))

    async def _use_fallback(self, index: int) -> P.Observation:
        fb = self.fallback
        assert fb is not None and fb.index == index
        self.fallback = None
        fb.priority = Priority.VERIFY  # now on the critical path
        await fb.finished.wait()
        if fb.failure is not None:
            raise fb.failure
        assert fb.session is not None
        run = self.fpsr
        old, run.T = run.T, fb.session  # a rejected candidate's tokens go with the old T
        fb.session = None
        run.target.close(old)
        d = self.drafts.get(index)
        await self.ctx.accept(
            fb.text, StepSource.TARGET, eos=fb.eos, rejected_draft=d.text if d else None, cost=fb.cost
        )
        self.resync = fb.text
        return P.TargetWrote(index, final=self.ctx.is_final(fb.text, fb.eos))


def _drain(recv: MemoryObjectReceiveStream[P.Observation | _Draft]) -> list[P.Observation | _Draft]:
    out: list[P.Observation | _Draft] = []
    while True:
        try:
            out.append(recv.receive_nowait())
        except anyio.WouldBlock:
            return out


async def run_fpsr(ctx: RequestContext, image: Any, *, inspect: Inspect | None = None) -> None:
    """Run FPSR for one request; steps and events go out through ``ctx``."""
    target, draft = ctx.target, ctx.draft
    assert target is not None and draft is not None
    sessions: dict[str, Session] = {}

    async def open_target() -> None:
        sessions["target"] = await calls.open_session(ctx, target, image)

    async def open_draft() -> None:
        try:
            sessions["draft"] = await calls.open_session(ctx, draft, image)
        except BackendError as e:
            _draft_failed(ctx, e)

    try:
        async with anyio.create_task_group() as tg:  # prefill both models at once
            tg.start_soon(open_target)
            if not ctx.alone:  # the load-aware switch may have sent this request to the target alone
                tg.start_soon(open_draft)
        if "draft" not in sessions:  # the target alone; what it writes is cached all the same
            await calls.target_alone(ctx, sessions["target"])
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
                await calls.target_alone(ctx, run.T)
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
