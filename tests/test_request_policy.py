"""FPSR's request policy as a pure state machine: every order of what a request's lanes, models,
cache and load report, enumerated, with no event loop and no model.

A small simulated world plays the executor (``engine.fpsr``): it opens the sessions, answers a
cache lookup, judges replayed steps, runs each epoch's draft lane (which writes a step only
with a permit, stops after a final step, and may fail), finishes a fallback at any moment,
and lets the load rise at any moment. The driver's own outcomes arrive after whatever the lanes
reported meanwhile, as in the executor. A depth-first search takes every possible order; each
complete run is checked against the policy's guarantees.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import pytest

from dreamr_stream.engine import policy as P
from dreamr_stream.engine import request_messages as RM
from dreamr_stream.engine.request_policy import RequestPolicy

OUTCOMES = (
    RM.OpenSessions,
    RM.LookUpCache,
    RM.ReplayStep,
    RM.CatchUpDraft,
    RM.ResyncDraft,
    RM.WriteAlone,
    P.Judge,
    P.UseFallback,
    P.WriteTarget,
    P.EndEpoch,
)
HIGH_LOAD = RM.Replan(0, "load: 5 requests in flight (speculating up to 2)")


@dataclass(frozen=True)
class Scenario:
    verdicts: tuple[bool, ...] = (True, True, True, True)  # per step index: the draft's step is accepted
    draft_final_at: int | None = None  # the draft's step at this index is final
    target_final_at: int | None = None  # the target's own step at this index is final
    empty: frozenset[int] = frozenset()  # the draft writes nothing at these indices
    cache: bool = False  # the request has a trajectory cache
    cached: tuple[bool, ...] | None = None  # a hit's steps (per step: accepted); None: a miss
    trust: bool = False
    open_fails: bool = False  # the draft's session fails to open
    draft_fails_at: int | None = None  # the draft lane's n-th write (over the request) fails
    sync_fails: bool = False  # catching up / resyncing the draft fails
    load: Literal["none", "start", "any"] = "none"  # the load rises above the limit: never, at the start, any time
    fallback: str = "off"
    repairable: bool = True
    lookahead: int = 2
    max_steps: int = 3


@dataclass
class World:
    s: Scenario
    policy: RequestPolicy
    log: list[RM.Action] = field(default_factory=list)
    verified: list[tuple[int, str, bool]] = field(default_factory=list)  # (index, source, final)
    outcome: list[RM.Observation] | None = None
    draft_open: bool = False
    lanes: bool = False  # an epoch's lanes run (until EpochEnded is fed)
    permits: list[int] = field(default_factory=list)  # granted, not yet written
    next_permit: int = 0
    lane_alive: bool = False
    lane_writes: int = 0
    drafted_final: int | None = None  # the epoch's drafted final step
    fallback: int | None = None
    fallback_done: bool = False
    load_fired: bool = False
    replayed: dict[int, bool] = field(default_factory=dict)

    # ------------------------------------------------------------------ what can happen
    def events(self) -> list[str]:
        ready = []
        if self.lanes and self.lane_alive and self.permits:
            ready.append("draft")
        if self.lanes and self.fallback is not None and not self.fallback_done:
            ready.append("fallback")
        if self.s.load == "any" and not self.load_fired and not self.policy.finished:
            ready.append("load")
        if self.outcome is not None:
            ready.append("outcome")
        return ready

    def fire(self, event: str) -> None:
        if event == "draft":
            index = self.permits.pop(0)
            assert index < len(self.verified) + self.s.lookahead, "drafted beyond the lookahead window"
            self.lane_writes += 1
            if self.s.draft_fails_at == self.lane_writes:
                self.lane_alive = False
                self.feed(RM.DraftFailed("injected"))
                return
            final = index == self.s.draft_final_at
            self.lane_alive = not final  # nothing is written after a final step
            self.drafted_final = index if final else self.drafted_final
            self.feed(P.Drafted(index, empty=index in self.s.empty, final=final))
        elif event == "fallback":
            self.fallback_done = True
            assert self.fallback is not None
            self.feed(P.FallbackDone(self.fallback))
        elif event == "load":
            self.load_fired = True
            self.feed(HIGH_LOAD)
        else:
            news, self.outcome = self.outcome, None
            assert news is not None
            for obs in news:
                if isinstance(obs, RM.EpochEnded):
                    self.lanes, self.lane_alive, self.permits, self.fallback = False, False, [], None
                self.feed(obs)

    def feed(self, obs: RM.Observation) -> None:
        self.perform(self.policy.on(obs))

    # ------------------------------------------------------------------ the executor's part
    def perform(self, actions: list[RM.Action]) -> None:
        for i, action in enumerate(actions):
            assert not any(isinstance(a, RM.Finish) for a in self.log), "an action after Finish"
            self.log.append(action)
            if isinstance(action, OUTCOMES):
                assert i == len(actions) - 1, f"{action} does not end its batch {actions}"
            self.act(action)

    def act(self, action: RM.Action) -> None:
        match action:
            case RM.OpenSessions(draft=draft):
                opens = draft and not self.s.open_fails
                self.draft_open = opens
                failed: list[RM.Observation] = [RM.DraftFailed("open")] if draft and not opens else []
                self.set_outcome(*failed, RM.Opened(draft=opens))
            case RM.LookUpCache():
                assert self.s.cache and self.draft_open
                cached = self.s.cached
                self.set_outcome(RM.CacheMiss() if cached is None else RM.CacheHit(len(cached)))
            case RM.ReplayStep(index=i, trust=trust):
                assert self.s.cached is not None and i == len(self.verified) < len(self.s.cached)
                assert trust == self.s.trust
                self.replayed[i] = trust or self.s.cached[i]
                self.set_outcome(RM.ReplayJudged(i, self.replayed[i], final=i == len(self.s.cached) - 1))
            case RM.AcceptCached(index=i):
                assert self.replayed[i]
                assert self.s.cached is not None
                self.verified.append((i, "cache", i == len(self.s.cached) - 1))
            case RM.RejectCached(index=i):
                assert not self.replayed[i]
            case RM.CatchUpDraft(steps=n) | RM.ResyncDraft(index=n):
                self.check_speculating(action)
                assert self.draft_open and not self.lanes
                if isinstance(action, RM.ResyncDraft):
                    assert n == len(self.verified) - 1 and self.verified[-1][1] == "target", "resync of no target step"
                else:
                    assert n == len(self.verified) and all(src == "cache" for _, src, _ in self.verified)
                self.set_outcome(RM.DraftFailed("sync") if self.s.sync_fails else RM.DraftSynced())
            case RM.StartEpoch(start=start):
                self.check_speculating(action)
                assert self.draft_open and not self.lanes and start == len(self.verified)
                self.lanes, self.lane_alive, self.next_permit, self.drafted_final = True, True, start, None
            case RM.PermitDraft(index=i):
                self.check_speculating(action)
                assert self.lanes and i == self.next_permit, "permits out of order"
                assert i < min(len(self.verified) + self.s.lookahead, self.s.max_steps), "a permit beyond the window"
                assert self.drafted_final is None, "a permit after a final draft"
                self.next_permit += 1
                self.permits.append(i)
            case RM.GoAlone():
                assert sum(isinstance(a, RM.GoAlone) for a in self.log) == 1, "go-alone said twice"
            case RM.WriteAlone(index=i):
                assert any(isinstance(a, RM.GoAlone) for a in self.log) and i == len(self.verified)
                self.target_step(i)
                self.set_outcome(RM.AloneWrote(i, final=self.verified[-1][2]))
            case RM.Store():
                assert self.s.cache and self.verified and self.verified[-1][2], "stored an unfinished trajectory"
            case RM.Finish():
                pass
            case _:
                self.act_epoch(action)

    def act_epoch(self, action: P.Action) -> None:
        assert self.lanes, f"{action} outside an epoch"
        match action:
            case P.Judge(index=i):
                assert i not in self.s.empty, "judged an empty draft"
                self.set_outcome(P.Judged(i, self.s.verdicts[i], self.s.repairable))
            case P.Accept(index=i):
                self.verified.append((i, "draft", i == self.s.draft_final_at))
            case P.StartFallback(index=i):
                assert self.fallback is None
                self.fallback, self.fallback_done = i, False
            case P.DropFallback() | P.UseFallback():
                assert self.fallback == action.index
                self.fallback = None
                if isinstance(action, P.UseFallback):
                    self.target_step(action.index)
                    self.set_outcome(P.TargetWrote(action.index, final=self.verified[-1][2]))
            case P.WriteTarget(index=i):
                assert self.fallback is None
                self.target_step(i)
                self.set_outcome(P.TargetWrote(i, final=self.verified[-1][2]))
            case P.EndEpoch():
                self.set_outcome(RM.EpochEnded())
            case P.Reject():
                pass

    # ------------------------------------------------------------------ helpers
    def check_speculating(self, action: RM.Action) -> None:
        assert not any(isinstance(a, RM.GoAlone) for a in self.log), f"{action} after going alone"

    def target_step(self, index: int) -> None:
        self.verified.append((index, "target", index == self.s.target_final_at))

    def set_outcome(self, *news: RM.Observation) -> None:
        assert self.outcome is None, "two outcomes outstanding"
        self.outcome = list(news)


def explore(s: Scenario) -> list[World]:
    """Every complete run of scenario ``s``."""
    policy = RequestPolicy(
        max_steps=s.max_steps, lookahead=s.lookahead, fallback=s.fallback, on_gpu=False, cache=s.cache, trust=s.trust
    )
    root = World(s, policy)
    first = policy.on(HIGH_LOAD) if s.load == "start" else []
    root.perform([*first, *policy.begin()])
    runs = list(runs_from(root))
    assert len(runs) < 200_000
    return runs


def runs_from(w: World) -> Iterator[World]:
    """Depth first: every event that can happen next, each in a copy of the world."""
    choices = w.events()
    if w.policy.finished and "outcome" not in choices:
        yield w
        return
    assert choices, f"stuck: nothing can happen (log {w.log})"
    for event in choices:
        nxt = copy.deepcopy(w)
        nxt.fire(event)
        yield from runs_from(nxt)


def check(s: Scenario) -> list[World]:
    runs = explore(s)
    assert runs
    for w in runs:
        assert isinstance(w.log[-1], RM.Finish) and sum(isinstance(a, RM.Finish) for a in w.log) == 1
        indices = [i for i, _, _ in w.verified]
        assert indices == list(range(len(indices))), "steps verified out of order or twice"
        finals = [final for _, _, final in w.verified]
        assert not any(finals[:-1]), "a step verified after a final one"
        assert finals[-1] or len(indices) == s.max_steps, "the request ended early"
        assert (RM.Store() in w.log) == (s.cache and finals[-1])
        starts = [a for a in w.log if isinstance(a, RM.StartEpoch)]
        assert len(starts) == sum(isinstance(a, P.EndEpoch) for a in w.log), "an epoch left running"
        if s.load == "start":
            assert w.log[:2] == [RM.GoAlone(HIGH_LOAD.reason), RM.OpenSessions(False)]
    if s.load != "any":  # greedy decisions do not depend on timing
        assert len({tuple(w.verified) for w in runs}) == 1, {tuple(w.verified) for w in runs}
    return runs


SCENARIOS = [
    Scenario(),  # every draft accepted: the request ends at max_steps
    Scenario(draft_final_at=1),  # the final draft accepted
    Scenario(verdicts=(True, False, True)),  # a rejection: the target's step, a resync, a new epoch
    Scenario(verdicts=(False, False, False), target_final_at=2),
    Scenario(verdicts=(True, True, True), empty=frozenset({1})),  # an empty draft: the target writes it
    Scenario(verdicts=(True, False, True), lookahead=1),
    Scenario(verdicts=(True, False, True), sync_fails=True),  # the resync fails: the target goes alone
    Scenario(draft_fails_at=2),  # the lane fails on its second step
    Scenario(verdicts=(False, True, True), draft_fails_at=2),
    Scenario(open_fails=True, target_final_at=1),  # no draft at all
    Scenario(load="start"),  # the load-aware switch
    Scenario(load="any", verdicts=(True, False, True)),
    Scenario(load="any", lookahead=1),
    Scenario(cache=True),  # a miss: the trajectory is stored only if it finished
    Scenario(cache=True, draft_final_at=2),
    Scenario(cache=True, cached=(True, True), target_final_at=2, draft_final_at=2),  # a hit, then the draft
    Scenario(cache=True, cached=(True, False)),  # the replay stops at the rejection
    Scenario(cache=True, cached=(True, True, True)),  # the whole trajectory replayed
    Scenario(cache=True, cached=(False, False), trust=True),  # trusted steps are not judged
    Scenario(cache=True, cached=(True,), sync_fails=True),  # catching up fails: the target goes alone
    Scenario(cache=True, cached=(True, True), load="any"),
]


def scenario_id(s: Scenario) -> str:
    """The fields that differ from the defaults."""
    default = Scenario()
    return ",".join(f"{k}={v}" for k, v in s.__dict__.items() if v != getattr(default, k)) or "default"


@pytest.mark.parametrize("fallback", ["off", "on"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=scenario_id)
def test_every_order_keeps_the_guarantees(scenario: Scenario, fallback: str) -> None:
    check(replace(scenario, fallback=fallback))


def test_the_window_is_the_lookahead() -> None:
    """Permits run exactly ``lookahead`` steps ahead of the last verified step."""
    for lookahead in (1, 2, 3):
        s = Scenario(verdicts=(True,) * 5, max_steps=5, lookahead=lookahead)
        p = RequestPolicy(max_steps=5, lookahead=lookahead, fallback="off", on_gpu=False)
        p.begin()
        actions = p.on(RM.Opened(draft=True))
        assert actions == [RM.StartEpoch(0), *(RM.PermitDraft(i) for i in range(lookahead))]
        assert p.on(P.Drafted(0)) == [P.Judge(0)]
        assert p.on(P.Judged(0, accepted=True))[:2] == [P.Accept(0), RM.PermitDraft(lookahead)]
        check(s)


def test_a_draft_without_a_permit_is_an_error() -> None:
    p = RequestPolicy(max_steps=4, lookahead=1, fallback="off", on_gpu=False)
    p.begin()
    p.on(RM.Opened(draft=True))
    p.on(P.Drafted(0))
    with pytest.raises(ValueError, match="without a permit"):
        p.on(P.Drafted(1))


def test_going_alone_is_said_once_and_never_undone() -> None:
    p = RequestPolicy(max_steps=3, lookahead=2, fallback="off", on_gpu=False)
    p.begin()
    assert p.on(RM.Opened(draft=True))[0] == RM.StartEpoch(0)
    assert p.on(RM.DraftFailed("boom")) == [RM.GoAlone("draft failed: boom", "boom"), P.WriteTarget(0)]
    assert p.on(HIGH_LOAD) == [] and p.on(RM.Replan(2)) == []
    assert p.on(P.TargetWrote(0)) == [P.EndEpoch(resync=True)]
    assert p.on(RM.EpochEnded()) == [RM.WriteAlone(1)]  # no resync: the draft is out
    assert p.on(RM.AloneWrote(1, final=True)) == [RM.Finish()]
    assert p.finished and p.on(RM.AloneWrote(2)) == []  # nothing after the end


def test_the_target_alone_writes_the_rest_in_one_outcome_or_several() -> None:
    """One call may write every remaining step (a served target streams them); a call that
    stops short (its stream ended) is followed by another from where it stopped."""
    p = RequestPolicy(max_steps=6, lookahead=2, fallback="off", on_gpu=False)
    p.on(HIGH_LOAD)
    assert p.begin() == [RM.OpenSessions(draft=False)]
    assert p.on(RM.Opened(draft=False)) == [RM.WriteAlone(0)]
    assert p.on(RM.AloneWrote(0, steps=2)) == [RM.WriteAlone(2)]
    assert p.on(RM.AloneWrote(2, final=True, steps=3)) == [RM.Finish()]
    assert p.verified == 5 and p.finished
    q = RequestPolicy(max_steps=6, lookahead=2, fallback="off", on_gpu=False)
    q.on(HIGH_LOAD)
    q.begin()
    q.on(RM.Opened(draft=False))
    with pytest.raises(ValueError, match="wrote 0 steps"):
        q.on(RM.AloneWrote(0, steps=0))


def test_outcomes_out_of_turn_are_errors() -> None:
    p = RequestPolicy(max_steps=3, lookahead=2, fallback="off", on_gpu=False, cache=True)
    with pytest.raises(ValueError, match="unexpected"):
        p.on(RM.Opened(draft=True))  # before begin
    p.begin()
    with pytest.raises(ValueError, match="unexpected"):
        p.on(RM.CacheMiss())
    with pytest.raises(ValueError, match="draft's session is missing"):
        p.on(RM.Opened(draft=False))


def test_the_enumeration_is_exhaustive_enough_to_matter() -> None:
    total = sum(len(explore(replace(s, fallback=f))) for s in SCENARIOS for f in ("off", "on"))
    assert total > 1000
