"""FPSR's decisions for one epoch, as a pure synchronous state machine.

An epoch starts from the verified prefix (``start`` steps) and ends with the first step the
target writes itself (after a rejection, an empty draft, or drafts that ran out) or with the
final step. ``EpochPolicy`` decides; ``engine.fpsr`` performs. It runs inside the request's
policy (``engine.request_policy.RequestPolicy``), which starts each epoch, passes its actions
on and owns what spans epochs: the lookahead window (the draft lane writes only the steps that
policy permits), the cache replay, resyncs, going alone. The driver feeds what happened
(``Observation``) and performs what the policy answers (``Action``), in order:

* from the draft lane, whenever it happens: ``Drafted`` (in index order), ``DraftsEnded``;
* from the target's fallback lane: ``FallbackDone``;
* the outcome of the driver's own work: ``Judged`` after a ``Judge``, ``TargetWrote`` after a
  ``UseFallback`` or ``WriteTarget``. At most one such action is outstanding at a time, and it
  is always the last of a batch: the driver feeds its outcome before anything else it performs.

The policy holds no model, task, lock or clock, so every interleaving of those observations
can be enumerated and checked in plain tests (``tests/test_policy.py``). What it guarantees:
steps are verified in index order, each exactly once; at most one judge or target write is in
flight; a fallback is used only for the step it was started for and only once; a rejected
step that can be repaired is repaired unless its fallback already finished (then that step is
free); the epoch ends exactly once, with ``EndEpoch``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import assert_never

__all__ = [
    "Accept",
    "Action",
    "Drafted",
    "DraftsEnded",
    "DropFallback",
    "EndEpoch",
    "EpochPolicy",
    "FallbackDone",
    "Judge",
    "Judged",
    "Observation",
    "Reject",
    "StartFallback",
    "TargetWrote",
    "UseFallback",
    "WriteTarget",
    "fallback_enabled",
]


def fallback_enabled(mode: str, *, on_gpu: bool, judged: int, accepted: int) -> bool:
    """``auto``: on a GPU always (lanes truly overlap); on a CPU only while this request's
    drafts are mostly rejected (>= 2 judged, acceptance < 50%), since there a speculative
    target step competes with the draft for the same cores."""
    if mode != "auto":
        return mode == "on"
    if on_gpu:
        return True
    return judged >= 2 and accepted / judged < 0.5


# ---------------------------------------------------------------------- observations
@dataclass(frozen=True)
class Drafted:
    """The draft wrote step ``index`` (``empty``: no text, no evidence; ``final``: it ends the
    reasoning, e.g. the answer step)."""

    index: int
    empty: bool = False
    final: bool = False


@dataclass(frozen=True)
class DraftsEnded:
    """The draft lane will send no more steps (it wrote a final one, hit the step limit, or
    failed)."""


@dataclass(frozen=True)
class Judged:
    """TBVM's verdict on step ``index``; ``repairable``: the scoring showed where the target
    departs from it, and the backend can continue the target's step from there."""

    index: int
    accepted: bool
    repairable: bool = False


@dataclass(frozen=True)
class FallbackDone:
    """The target's own step ``index`` on the fallback lane is written."""

    index: int


@dataclass(frozen=True)
class TargetWrote:
    """The target's step ``index`` is verified (written, repaired or taken from the fallback)."""

    index: int
    final: bool = False


Observation = Drafted | DraftsEnded | Judged | FallbackDone | TargetWrote


# ---------------------------------------------------------------------- actions
@dataclass(frozen=True)
class Judge:
    """Score drafted step ``index`` on the target (outcome: ``Judged``)."""

    index: int


@dataclass(frozen=True)
class Accept:
    """Drafted step ``index`` is verified: yield it (the request's policy then permits the
    draft one step further)."""

    index: int


@dataclass(frozen=True)
class Reject:
    """Drafted step ``index`` was judged and rejected (tell the listeners)."""

    index: int


@dataclass(frozen=True)
class StartFallback:
    """Start the target writing its own step ``index`` on a fork, at low priority."""

    index: int


@dataclass(frozen=True)
class DropFallback:
    """Cancel the fallback of step ``index`` (its fork is freed at the end of the epoch)."""

    index: int


@dataclass(frozen=True)
class UseFallback:
    """Wait for the fallback's step ``index`` and adopt its session (outcome: ``TargetWrote``)."""

    index: int


@dataclass(frozen=True)
class WriteTarget:
    """The target writes step ``index`` on its session: repaired from the rejected draft when
    ``repair``, else whole (outcome: ``TargetWrote``)."""

    index: int
    repair: bool = False


@dataclass(frozen=True)
class EndEpoch:
    """Stop the draft lane; ``resync``: the draft adopts the target's last step and a new epoch
    starts from it."""

    resync: bool


Action = Judge | Accept | Reject | StartFallback | DropFallback | UseFallback | WriteTarget | EndEpoch


class _Busy(Enum):
    IDLE = "idle"  # waiting for a draft
    JUDGING = "judging"
    WRITING = "writing"  # the target's step, after a rejection or without a draft
    ENDED = "ended"


class EpochPolicy:
    """One epoch's decisions. ``judged`` / ``accepted``: this request's counts so far (the
    ``auto`` fallback mode follows the request's acceptance)."""

    def __init__(
        self, start: int, *, max_steps: int, fallback: str, on_gpu: bool, judged: int = 0, accepted: int = 0
    ) -> None:
        self.next = start  # the index of the next step to verify
        self.max_steps = max_steps
        self.fallback_mode = fallback
        self.on_gpu = on_gpu
        self.judged = judged
        self.accepted = accepted
        self.busy = _Busy.IDLE
        self.queue: deque[Drafted] = deque()  # drafted, not yet judged
        self.judging: Drafted | None = None
        self.drafts_ended = False
        self.fallback: int | None = None  # the step the running fallback writes
        self.fallback_done = False

    @property
    def ended(self) -> bool:
        return self.busy is _Busy.ENDED

    def begin(self) -> list[Action]:
        return self._maybe_fallback()

    def on(self, obs: Observation) -> list[Action]:
        if self.ended:
            return []  # a late draft or fallback after the epoch's end: nothing to decide
        match obs:
            case Drafted():
                self.queue.append(obs)
                return self._advance()
            case DraftsEnded():
                self.drafts_ended = True
                return self._advance()
            case FallbackDone(index=index):
                if index == self.fallback:
                    self.fallback_done = True
                return []
            case Judged():
                return self._judged(obs)
            case TargetWrote(index=index, final=final):
                self._expect(_Busy.WRITING, index)
                self.next += 1
                self.busy = _Busy.ENDED
                return [EndEpoch(resync=not final and self.next < self.max_steps)]
            case _:
                assert_never(obs)

    # ------------------------------------------------------------------ decisions
    def _advance(self) -> list[Action]:
        """Take the next drafted step, or let the target write one when no draft will come."""
        if self.busy is not _Busy.IDLE:
            return []
        if self.queue:
            d = self.queue.popleft()
            if d.index != self.next:
                raise ValueError(f"drafted step {d.index} arrived while step {self.next} is next")
            if d.empty:  # no evidence to judge: the target writes this step
                return self._target(d.index, repairable=False)
            self.busy, self.judging = _Busy.JUDGING, d
            return [Judge(d.index)]
        if self.drafts_ended:
            return self._target(self.next, repairable=False)
        return []

    def _judged(self, j: Judged) -> list[Action]:
        self._expect(_Busy.JUDGING, j.index)
        self.judged += 1
        self.accepted += j.accepted
        if not j.accepted:
            return [Reject(j.index), *self._target(j.index, repairable=j.repairable)]
        actions: list[Action] = [*self._drop_fallback(), Accept(j.index)]
        self.next += 1
        assert self.judging is not None
        final, self.judging = self.judging.final, None
        if final or self.next >= self.max_steps:
            self.busy = _Busy.ENDED
            return [*actions, EndEpoch(resync=False)]
        self.busy = _Busy.IDLE
        return [*actions, *self._maybe_fallback(), *self._advance()]

    def _target(self, index: int, *, repairable: bool) -> list[Action]:
        """The target's own step ``index``: its fallback's when that is written already (free)
        or when there is nothing to repair from; else repaired (or written) on its session."""
        self.busy = _Busy.WRITING
        if self.fallback == index and (self.fallback_done or not repairable):
            self.fallback = None
            return [UseFallback(index)]
        return [*self._drop_fallback(), WriteTarget(index, repair=repairable)]

    def _maybe_fallback(self) -> list[Action]:
        if self.next >= self.max_steps or not fallback_enabled(
            self.fallback_mode, on_gpu=self.on_gpu, judged=self.judged, accepted=self.accepted
        ):
            return []
        self.fallback, self.fallback_done = self.next, False
        return [StartFallback(self.next)]

    def _drop_fallback(self) -> list[Action]:
        if self.fallback is None:
            return []
        index, self.fallback = self.fallback, None
        return [DropFallback(index)]

    # ------------------------------------------------------------------ bookkeeping
    def _expect(self, busy: _Busy, index: int) -> None:
        if self.busy is not busy or index != self.next:
            raise ValueError(f"unexpected outcome for step {index}: the policy is {self.busy.value} at {self.next}")
