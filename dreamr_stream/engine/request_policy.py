"""FPSR's decisions for one request, as a pure synchronous state machine above ``EpochPolicy``.

``RequestPolicy`` owns a request's state from its sessions opening to its end, the way
websockets' Sans-I/O protocol object owns a connection's state while the connection only moves
bytes: ``engine.fpsr`` performs what it answers (``Action``) and feeds back what happened
(``Observation``), in order. A request goes through these phases:

* open the sessions (``OpenSessions``), the draft's only while speculating;
* with a draft and a cache: look the trajectory up (``LookUpCache``); a hit's steps are free
  drafts, replayed one at a time (``ReplayStep``: judged by TBVM, or with ``trust`` taken as
  they are), each then accepted (``AcceptCached``) or the first rejected one dropped
  (``RejectCached``); the draft then catches up on the verified prefix (``CatchUpDraft``);
* epochs (``StartEpoch``), each decided by an ``EpochPolicy`` whose actions pass through. The
  lookahead window is this policy's: ``PermitDraft(i)`` lets the draft lane write step ``i``,
  never more than ``lookahead`` steps beyond the last verified one; once the lane can write no
  more (a final draft, its failure, no permit to come) the epoch hears ``DraftsEnded``. After
  ``EndEpoch`` the driver stops the lanes and says ``EpochEnded``; a target step the draft must
  adopt is then ``ResyncDraft`` (roll back, append the target's step);
* the target alone (``WriteAlone``), for the rest of the request, once it goes alone: the draft
  failed (``DraftFailed``) or the speculation schedule says so (``Replan`` to a lookahead of 0:
  too many requests in flight, too low an acceptance); a ``Replan`` above 0 sets the lookahead
  from the next permit on.
  ``GoAlone`` is said once, with its reason, and never undone; drafts already permitted may
  still be verified, nothing more is drafted;
* the end: ``Store`` (only when the last verified step is final and the request caches), then
  ``Finish``; nothing follows.

Outcome-producing actions (``OpenSessions``, ``LookUpCache``, ``ReplayStep``, ``CatchUpDraft``,
``ResyncDraft``, ``WriteAlone``, ``EndEpoch`` and the epoch's own) end their batch, and at
most one is outstanding: the driver feeds its outcome after whatever the lanes reported
meanwhile. Every order of observations (up to a bound) is enumerated and checked in
``tests/test_request_policy.py``.
"""

from __future__ import annotations

from enum import Enum
from typing import assert_never

from dreamr_stream.engine import policy as P
from dreamr_stream.engine.request_messages import (
    AcceptCached,
    Action,
    AloneWrote,
    CacheHit,
    CacheMiss,
    CatchUpDraft,
    DraftFailed,
    DraftSynced,
    EpochEnded,
    Finish,
    GoAlone,
    LookUpCache,
    Observation,
    Opened,
    OpenSessions,
    PermitDraft,
    RejectCached,
    Replan,
    ReplayJudged,
    ReplayStep,
    ResyncDraft,
    StartEpoch,
    Store,
    WriteAlone,
)

__all__ = ["RequestPolicy"]


class _Phase(Enum):
    START = "start"
    OPENING = "opening"
    LOOKUP = "lookup"
    REPLAY = "replay"
    SYNCING = "syncing"  # the draft catching up or resyncing
    EPOCH = "epoch"
    CLOSING = "closing"  # EndEpoch said, its lanes being stopped
    ALONE = "alone"  # the target writing a step alone
    FINISHED = "finished"


class RequestPolicy:
    """One request's decisions. ``cache``: the request has a trajectory cache (looked up with
    a draft, stored whenever the trajectory finishes); ``trust``: cached steps need no
    verification; the rest configures each epoch's ``EpochPolicy``."""

    def __init__(
        self,
        *,
        max_steps: int,
        lookahead: int,
        fallback: str,
        on_gpu: bool,
        cache: bool = False,
        trust: bool = False,
    ) -> None:
        self.max_steps, self.lookahead, self.fallback, self.on_gpu = max_steps, lookahead, fallback, on_gpu
        self.cache, self.trust = cache, trust
        self.phase = _Phase.START
        self.verified = 0  # steps verified so far
        self.final = False  # the last verified step ends the reasoning
        self.alone = False
        self.judged = self.accepted = 0  # the draft's steps judged / accepted, over the epochs
        self.cached = 0  # a hit's steps
        self.epoch: P.EpochPolicy | None = None
        self.resync = False  # the epoch ended with a target step the draft must adopt
        # the lookahead window of the running epoch: steps the lane may write (< granted), has
        # written (< drafted), the drafts' finality, whether it will write no more
        self.granted = self.drafted = 0
        self.draft_final: dict[int, bool] = {}
        self.lane_over = False
        self.drafts_ended = False

    @property
    def finished(self) -> bool:
        return self.phase is _Phase.FINISHED

    @property
    def done(self) -> bool:
        """No step follows: the last one is final, or the step limit is reached."""
        return self.final or self.verified >= self.max_steps

    def begin(self) -> list[Action]:
        self._expect(_Phase.START)
        self.phase = _Phase.OPENING
        return [OpenSessions(draft=not self.alone)]

    def on(self, obs: Observation) -> list[Action]:
        if self.finished:
            return []
        match obs:
            case Replan(lookahead=lookahead, reason=reason):
                if lookahead < 1:
                    return self._go_alone(reason or "the schedule: the target alone")
                self.lookahead = min(lookahead, self.max_steps)  # from the next permit on
                return []
            case DraftFailed(error=error):
                return self._draft_failed(error)
            case Opened(draft=draft):
                self._expect(_Phase.OPENING)
                if not draft and not self.alone:
                    raise ValueError("the draft's session is missing while speculating")
                if draft and self.cache:
                    self.phase = _Phase.LOOKUP
                    return [LookUpCache()]
                return self._next()
            case CacheMiss():
                self._expect(_Phase.LOOKUP)
                return self._next()
            case CacheHit(steps=steps):
                self._expect(_Phase.LOOKUP)
                self.cached = steps
                return self._replay()
            case ReplayJudged():
                return self._replay_judged(obs)
            case DraftSynced():
                self._expect(_Phase.SYNCING)
                return self._next()
            case EpochEnded():
                self._expect(_Phase.CLOSING)
                self.epoch = None
                if self.resync and not self.done and not self.alone:
                    self.phase = _Phase.SYNCING
                    return [ResyncDraft(self.verified - 1)]
                return self._next()
            case AloneWrote(index=index, final=final, steps=steps):
                self._expect(_Phase.ALONE, index)
                if steps < 1:
                    raise ValueError(f"the target alone wrote {steps} steps from step {index}")
                self.verified += steps - 1
                self._verified(final)
                return self._next()
            case P.Drafted() | P.DraftsEnded() | P.Judged() | P.FallbackDone() | P.TargetWrote():
                return self._epoch_on(obs)
            case _:
                assert_never(obs)

    # ------------------------------------------------------------------ the request's course
    def _next(self) -> list[Action]:
        """What follows a phase: the end, the target alone, or an epoch."""
        if self.done:
            self.phase = _Phase.FINISHED
            return [Store(), Finish()] if self.cache and self.final else [Finish()]
        if self.alone:
            self.phase = _Phase.ALONE
            return [WriteAlone(self.verified)]
        return self._start_epoch()

    def _go_alone(self, reason: str, error: str | None = None) -> list[Action]:
        if self.alone:
            return []  # said once, with the first reason
        self.alone = True
        return [GoAlone(reason, error), *self._lane_check()]

    def _draft_failed(self, error: str) -> list[Action]:
        actions = self._go_alone(f"draft failed: {error}", error)
        if self.phase is _Phase.EPOCH:  # the lane failed: it writes no more
            self.lane_over = True
            actions += self._lane_check()
        elif self.phase is _Phase.SYNCING:  # the outcome of a catch-up or resync
            actions += self._next()
        return actions

    def _verified(self, final: bool) -> None:
        self.verified += 1
        self.final = final

    # ------------------------------------------------------------------ cached steps
    def _replay(self) -> list[Action]:
        if self.verified < self.cached and not self.done:
            self.phase = _Phase.REPLAY
            return [ReplayStep(self.verified, self.trust)]
        return self._catch_up()

    def _replay_judged(self, obs: ReplayJudged) -> list[Action]:
        self._expect(_Phase.REPLAY, obs.index)
        if not obs.accepted:  # the first rejection ends the replay
            return [RejectCached(obs.index), *self._catch_up()]
        self._verified(obs.final)
        return [AcceptCached(obs.index), *self._replay()]

    def _catch_up(self) -> list[Action]:
        """The draft continues from the verified prefix: it appends the adopted steps."""
        self.cached = 0
        if self.verified and not self.done and not self.alone:
            self.phase = _Phase.SYNCING
            return [CatchUpDraft(self.verified)]
        return self._next()

    # ------------------------------------------------------------------ epochs
    def _start_epoch(self) -> list[Action]:
        self.phase = _Phase.EPOCH
        start = self.verified
        self.epoch = P.EpochPolicy(
            start,
            max_steps=self.max_steps,
            fallback=self.fallback,
            on_gpu=self.on_gpu,
            judged=self.judged,
            accepted=self.accepted,
        )
        self.granted = self.drafted = start
        self.draft_final = {}
        self.lane_over = self.drafts_ended = self.resync = False
        return [StartEpoch(start), *self._grant(), *self._pass(self.epoch.begin())]

    def _epoch_on(self, obs: P.Observation) -> list[Action]:
        if self.phase is not _Phase.EPOCH:
            return []  # a lane's report after its epoch ended: nothing to decide
        assert self.epoch is not None
        match obs:
            case P.Drafted(index=index, final=final):
                if index != self.drafted or index >= self.granted:
                    raise ValueError(f"drafted step {index} without a permit (granted up to {self.granted})")
                self.drafted += 1
                self.draft_final[index] = final
                self.lane_over |= final  # nothing is written after a final step
                return [*self._pass(self.epoch.on(obs)), *self._lane_check()]
            case P.DraftsEnded():
                self.lane_over = True
                return self._lane_check()
            case P.TargetWrote(final=final):
                actions = self.epoch.on(obs)  # checks that the outcome is the expected one
                self._verified(final)
                return self._pass(actions)
            case _:
                return self._pass(self.epoch.on(obs))

    def _pass(self, actions: list[P.Action]) -> list[Action]:
        """The epoch's actions, with what they mean for the request: an accepted draft moves
        the window on; the epoch's end is remembered."""
        assert self.epoch is not None
        out: list[Action] = []
        for action in actions:
            out.append(action)
            match action:
                case P.Accept(index=index):
                    self._verified(self.draft_final[index])
                    out += self._grant()
                case P.EndEpoch(resync=resync):
                    self.phase, self.resync = _Phase.CLOSING, resync
                    self.judged, self.accepted = self.epoch.judged, self.epoch.accepted
        return out

    def _grant(self) -> list[Action]:
        """Permits up to ``lookahead`` steps beyond the last verified one."""
        assert self.epoch is not None
        if self.alone or self.lane_over or self.epoch.ended:
            return []
        upto = min(self.verified + self.lookahead, self.max_steps)
        permits: list[Action] = [PermitDraft(i) for i in range(self.granted, upto)]
        self.granted = max(self.granted, upto)
        return permits

    def _lane_check(self) -> list[Action]:
        """The epoch hears ``DraftsEnded`` once the lane will write no more: it wrote a final
        step or failed, or it wrote every permitted step and no permit will follow."""
        if self.phase is not _Phase.EPOCH or self.drafts_ended:
            return []
        no_more = self.alone or self.granted >= self.max_steps
        if not (self.lane_over or (no_more and self.drafted == self.granted)):
            return []
        self.drafts_ended = True
        assert self.epoch is not None
        return self._pass(self.epoch.on(P.DraftsEnded()))

    # ------------------------------------------------------------------ bookkeeping
    def _expect(self, phase: _Phase, index: int | None = None) -> None:
        if self.phase is not phase or (index is not None and index != self.verified):
            what = "outcome" if index is None else f"outcome for step {index}"
            raise ValueError(f"unexpected {what}: the request is {self.phase.value} at step {self.verified}")
