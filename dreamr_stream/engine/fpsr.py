"""FPSR: fully parallel speculative reasoning, gated by TBVM.

One request runs in *epochs*. An epoch starts from the verified prefix (k steps) with the
target session ``T`` and the draft session ``D`` both holding exactly those steps, and runs
three lanes at once:

* draft lane: writes steps k, k+1, ... on ``D``, each once it is permitted (at most
  ``lookahead`` steps ahead of the last verified one), and hands each to the verification lane
  in order;
* verification lane (the driver, this module): scores each drafted step on ``T`` in one
  forward (candidate + judge suffix); TBVM decides. Accept: the step is yielded and its tokens
  stay in ``T``. Reject: the target's own step replaces it and the epoch ends;
* target lane (the fallback): writes the target's own step on a fork of ``T``, at lower
  priority than verification, so that a rejection costs only what is left of that step.

A rejected step is repaired (``engine.repair``) unless its fallback finished first. At the end
of an epoch the draft lane is cancelled and awaited, ``D`` is rolled back to the verified
boundary and the target's step is appended to it; the next epoch begins. Before the first
epoch, the trajectory cached for the same request (``engine.cache``) is replayed as free
drafts. Greedy decisions do not depend on timing, so results are deterministic.

What to do when is decided by pure state machines: ``engine.request_policy.RequestPolicy``
(sessions, cache replay, epochs, the lookahead window, resync, going alone, storing) and the
``engine.policy.EpochPolicy`` it runs for each epoch. This module is their executor: it
performs their actions (model calls, tasks, cancel scopes, events, counts) and feeds back
what happened; it decides nothing.

The draft is an optimisation, not a dependency: when one of its calls fails (its process died,
its server errors), the request goes on with the target alone from the verified prefix, says
so once in a warning and in its stats (``target_alone_from``, ``target_alone_reason``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, assert_never

import anyio
from anyio.abc import TaskGroup

from dreamr_stream.backends.base import ScoreOutput, Session
from dreamr_stream.engine import calls
from dreamr_stream.engine import policy as P
from dreamr_stream.engine import request_messages as RM
from dreamr_stream.engine.lanes import Draft, EpochLanes, Fallback, Message
from dreamr_stream.engine.repair import can_repair, write_target_step
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.request_policy import RequestPolicy
from dreamr_stream.engine.runner import ModelRunner, Priority
from dreamr_stream.errors import BackendError
from dreamr_stream.events import CacheHitEvent, RejectedEvent
from dreamr_stream.types import StepSource, Verdict

__all__ = ["Inspect", "Replanner", "run_fpsr"]

log = logging.getLogger(__name__)
Inspect = Callable[[Session, Session], None]
Replanner = Callable[[], RM.Replan]


class _Executor:
    """Performs one request's actions (``RequestPolicy``, ``EpochPolicy``) and feeds back
    what happened."""

    def __init__(
        self,
        ctx: RequestContext,
        image: Any,
        policy: RequestPolicy,
        inspect: Inspect | None,
        replan: Replanner | None,
        load_changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        assert ctx.target is not None and ctx.draft is not None
        self.ctx, self.image, self.policy, self.inspect, self.replan = ctx, image, policy, inspect, replan
        self.load_changed = load_changed
        self.target: ModelRunner = ctx.target
        self.draft: ModelRunner = ctx.draft
        self.stop = ctx.config.generation.step_delimiter
        self.tg: TaskGroup
        self.sessions: dict[str, Session] = {}  # "T" (an adopted fallback fork, by then) and "D"
        self.lanes: EpochLanes | None = None
        self.fallback: Fallback | None = None  # the running one
        self.fallbacks: list[Fallback] = []  # the epoch's forks, freed at its end unless adopted
        self.drafts: dict[int, Draft] = {}
        self.judged: dict[int, tuple[Verdict, ScoreOutput]] = {}
        self.bounds: dict[int, int] = {}  # D's length before each step the draft lane wrote

    @property
    def T(self) -> Session:
        return self.sessions["T"]

    @property
    def D(self) -> Session:
        return self.sessions["D"]

    async def run(self, actions: list[RM.Action]) -> None:
        try:
            async with anyio.create_task_group() as self.tg:
                await self._drive(actions)
        finally:
            self._close()
            if self.ctx.cache is not None:
                await self.ctx.cache.flush_log()

    async def _drive(self, actions: list[RM.Action]) -> None:
        """Perform each batch in order, then feed the policy what the lanes reported meanwhile
        (first: the outcome is decided in that state) and the batch's outcome."""
        while True:
            outcome: list[RM.Observation] = []
            for action in actions:
                outcome += await self._perform(action)
            if self.policy.finished:
                return
            news = [self._observe(m) for m in (self.lanes.drain() if self.lanes else [])] + outcome
            if not news:
                assert self.lanes is not None, "the policy waits, and nothing runs"
                news = [self._observe(await self.lanes.recv.receive())]
            actions = [a for obs in news for a in self.policy.on(obs)]

    def _observe(self, message: Message) -> RM.Observation:
        if not isinstance(message, Draft):
            return message
        self.drafts[message.index] = message
        final = self.ctx.is_final(message.text, message.eos)
        return P.Drafted(message.index, empty=not message.text.strip(), final=final)

    async def _perform(self, action: RM.Action) -> list[RM.Observation]:
        ctx, cache = self.ctx, self.ctx.cache
        match action:
            case RM.OpenSessions(draft=draft):
                return await self._open(draft)
            case RM.LookUpCache():
                assert cache is not None
                steps = await cache.lookup()
                if steps is None:
                    return [RM.CacheMiss()]
                await ctx.emit(CacheHitEvent(steps=len(steps), elapsed_s=ctx.now()))
                return [RM.CacheHit(len(steps))]
            case RM.ReplayStep(index=i, trust=trust):
                return [await self._replay(i, trust)]
            case RM.AcceptCached(index=i):
                assert cache is not None
                judged = self.judged.get(i)
                await ctx.accept(cache.steps[i], StepSource.CACHE, verdict=judged[0] if judged else None)
            case RM.RejectCached(index=i):
                assert cache is not None
                await self._reject(i, cache.steps[i])
                await self.target.rollback(self.T, self.judged[i][1].n_tokens)
            case RM.CatchUpDraft(steps=n):
                return [await self._catch_up(n)]
            case RM.StartEpoch():
                await self._start_epoch()
            case RM.PermitDraft(index=i):
                assert self.lanes is not None
                self.lanes.permits.send_nowait(i)
            case RM.GoAlone(reason=reason, error=error):
                if error is not None:
                    log.warning("the draft failed; the target goes on alone: %s", error)
                ctx.go_alone(reason)
                if self.lanes is not None:  # mid-epoch: no more drafts, nor waiting for one under way
                    self.lanes.stop_draft()
            case RM.ResyncDraft(index=i):
                return [await self._resync(i)]
            case RM.WriteAlone(index=i):
                n = await calls.write_alone(ctx, self.target, self.T, StepSource.TARGET)
                return [RM.AloneWrote(i, final=bool(ctx.steps) and ctx.steps[-1].is_final, steps=n)]
            case RM.Store():
                assert cache is not None
                await cache.store_trajectory([s.text for s in ctx.steps])
            case RM.Finish():
                if self.inspect is not None and "D" in self.sessions:
                    self.inspect(self.T, self.D)
            case _:
                return await self._perform_epoch(action)
        return []

    # ------------------------------------------------------------------ sessions and the cache
    async def _open(self, draft: bool) -> list[RM.Observation]:
        """Prefill both models at once; a draft that fails to open is reported, not raised."""
        failed: list[RM.Observation] = []

        async def open_session(name: str, runner: ModelRunner) -> None:
            try:
                self.sessions[name] = await calls.open_session(self.ctx, runner, self.image)
            except BackendError as e:
                if runner is self.target:
                    raise
                failed.append(RM.DraftFailed(str(e)))

        async def open_draft() -> None:
            with self.ctx.draft_calls():
                await open_session("D", self.draft)

        async with anyio.create_task_group() as tg:
            tg.start_soon(open_session, "T", self.target)
            if draft:
                tg.start_soon(open_draft)
        return [*failed, RM.Opened(draft="D" in self.sessions)]

    async def _replay(self, index: int, trust: bool) -> RM.Observation:
        """Cached step ``index`` as a free draft: one target forward judges it; trusted, it is
        appended as it is."""
        ctx = self.ctx
        assert ctx.cache is not None
        text = ctx.cache.steps[index]
        if trust:
            await self.target.append(self.T, text, stop=self.stop)
            ctx.count(self.target, 1)
            return RM.ReplayJudged(index, True, final=ctx.is_final(text))
        verdict, score = await calls.judge(ctx, self.T, text, index, source=StepSource.CACHE)
        self.judged[index] = (verdict, score)
        return RM.ReplayJudged(index, verdict.accepted, final=ctx.is_final(text))

    async def _catch_up(self, n: int) -> RM.Observation:
        """The draft appends the first ``n`` verified steps."""
        try:
            with self.ctx.draft_calls():
                for step in self.ctx.steps[:n]:
                    await self.draft.append(self.D, step.text, stop=self.stop)
                    self.ctx.count(self.draft, 1)
        except BackendError as e:
            return RM.DraftFailed(str(e))
        return RM.DraftSynced()

    async def _resync(self, index: int) -> RM.Observation:
        """Roll ``D`` back to where step ``index`` begins and append the target's step."""
        ctx = self.ctx
        drop = self.D.length - self.bounds[index] if index in self.bounds else 0
        try:
            with ctx.draft_calls():
                if drop:
                    await self.draft.rollback(self.D, drop)
                async with ctx.span("draft", "resync", index):
                    n = await self.draft.append(self.D, ctx.steps[index].text, stop=self.stop)
        except BackendError as e:
            return RM.DraftFailed(str(e))
        ctx.count(self.draft, 1, n)
        return RM.DraftSynced()

    def _close(self) -> None:
        """Free what the request still holds: its lanes' channels, its forks, its sessions."""
        if self.lanes is not None:
            self.lanes.close()
        self._close_fallbacks()
        for name, runner in (("T", self.target), ("D", self.draft)):
            if name in self.sessions:
                with contextlib.suppress(BackendError):  # a failed draft may fail to free, too
                    runner.close(self.sessions.pop(name))

    # ------------------------------------------------------------------ epochs
    async def _start_epoch(self) -> None:
        self.drafts, self.judged, self.bounds = {}, {}, {}
        self.lanes = EpochLanes()
        await self.tg.start(self.lanes.run, self.ctx, self.D, self.bounds)
        if self.replan is not None and self.load_changed is not None:
            self.lanes.tg.start_soon(self._watch_load, self.lanes)

    async def _watch_load(self, lanes: EpochLanes) -> None:
        """While the epoch runs: when the load changes and the schedule now says the target
        alone, tell the driver at once (a draft slowed by a busy machine would otherwise hold
        the request until the epoch ends)."""
        assert self.replan is not None and self.load_changed is not None
        while True:
            await self.load_changed()
            now = self.replan()
            if now.lookahead < 1:
                with contextlib.suppress(anyio.ClosedResourceError):
                    lanes.send.send_nowait(now)
                return

    async def _end_epoch(self) -> list[RM.Observation]:
        assert self.lanes is not None
        lanes, self.lanes = self.lanes, None
        messages = await lanes.stop()
        self.fallback = None
        self._close_fallbacks()
        # the schedule again, for the next epoch (the load may have changed since the last)
        replanned = [self.replan()] if self.replan is not None and not self.policy.alone else []
        return [*(self._observe(m) for m in messages), *replanned, RM.EpochEnded()]

    def _close_fallbacks(self) -> None:
        """Free every fallback fork not adopted as ``T`` (their tasks have all ended)."""
        for fb in self.fallbacks:
            if fb.session is not None:
                self.target.close(fb.session)
                fb.session = None
        self.fallbacks.clear()

    async def _perform_epoch(self, action: P.Action) -> list[RM.Observation]:
        ctx = self.ctx
        match action:
            case P.Judge(index=i):
                verdict, score = await calls.judge(ctx, self.T, self.drafts[i].text, i)
                self.judged[i] = (verdict, score)
                return [P.Judged(i, verdict.accepted, can_repair(ctx, self.target, score))]
            case P.Accept(index=i):
                d, (verdict, _) = self.drafts[i], self.judged[i]
                await ctx.accept(d.text, StepSource.DRAFT, eos=d.eos, verdict=verdict)
            case P.Reject(index=i):
                await self._reject(i, self.drafts[i].text)
            case P.StartFallback(index=i):
                await self._start_fallback(i)
            case P.DropFallback():
                if self.fallback is not None:
                    self.fallback.cancel()
                    self.fallback = None
            case P.UseFallback(index=i):
                return [await self._use_fallback(i)]
            case P.WriteTarget(index=i):
                return [await self._write_target(i)]
            case P.EndEpoch():
                return await self._end_epoch()
            case _:
                assert_never(action)
        return []

    async def _reject(self, index: int, text: str) -> None:
        verdict, _ = self.judged[index]
        await self.ctx.emit(RejectedEvent(index=index, text=text, verdict=verdict, elapsed_s=self.ctx.now()))

    async def _start_fallback(self, index: int) -> None:
        assert self.lanes is not None
        # fork in the verification lane, before anything else touches T
        fork = await self.target.fork(self.T, priority=Priority.FALLBACK)
        fb = Fallback(index, session=fork)
        self.fallbacks.append(fb)  # owned by the epoch: closed there unless adopted
        self.fallback = fb
        self.lanes.tg.start_soon(fb.run, self.ctx, fork, self.lanes.send)

    async def _write_target(self, index: int) -> P.Observation:
        """The target's step on ``T``: a judged candidate (still in ``T``) is rolled back and,
        where the policy found it repairable, repaired (``engine.repair``)."""
        d = self.drafts.get(index)
        scored = self.judged.get(index)
        own = await write_target_step(
            self.ctx,
            self.target,
            self.T,
            index=index,
            rejected=d.text if d else "",
            score=scored[1] if scored else None,
        )
        rejected = d.text if d else None
        step = await self.ctx.accept(
            own.text, StepSource.TARGET, eos=own.eos, rejected_draft=rejected, kept=own.kept, cost=own.cost
        )
        return P.TargetWrote(index, final=step.is_final)

    async def _use_fallback(self, index: int) -> P.Observation:
        fb = self.fallback
        assert fb is not None and fb.index == index
        self.fallback = None
        fb.priority = Priority.VERIFY  # now on the critical path
        await fb.finished.wait()
        if fb.failure is not None:
            raise fb.failure
        assert fb.session is not None
        old, self.sessions["T"] = self.T, fb.session  # a rejected candidate's tokens go with the old T
        fb.session = None
        self.target.close(old)
        d = self.drafts.get(index)
        step = await self.ctx.accept(
            fb.text, StepSource.TARGET, eos=fb.eos, rejected_draft=d.text if d else None, cost=fb.cost
        )
        return P.TargetWrote(index, final=step.is_final)


async def run_fpsr(
    ctx: RequestContext,
    image: Any,
    *,
    replan: Replanner | None = None,
    load_changed: Callable[[], Awaitable[None]] | None = None,
    inspect: Inspect | None = None,
) -> None:
    """Run FPSR for one request; steps and events go out through ``ctx``. It starts on the
    plan the speculation schedule chose for it (``ctx.schedule``; None: speculate at the
    configured lookahead); ``replan``, the schedule's choice now, is asked as each epoch ends
    and mid-epoch whenever ``load_changed`` (awaited: the next change of the requests in
    flight) returns (None: the start's plan holds throughout)."""
    assert ctx.target is not None
    gen, scheduling, cache = ctx.config.generation, ctx.config.scheduling, ctx.cache
    policy = RequestPolicy(
        max_steps=gen.max_steps,
        lookahead=scheduling.lookahead,
        fallback=scheduling.fallback,
        on_gpu=ctx.target.capabilities.on_gpu,
        cache=cache is not None,
        trust=cache is not None and cache.trust,
    )
    start = ctx.schedule
    first = [*(policy.on(RM.Replan(start.lookahead, start.reason)) if start is not None else []), *policy.begin()]
    await _Executor(ctx, image, policy, inspect, replan, load_changed).run(first)
