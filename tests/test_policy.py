"""FPSR's epoch policy as a pure state machine: every interleaving of what the lanes report,
enumerated, with no event loop and no model.

A small simulated world plays the lanes: the draft lane writes steps while it holds a permit
(``lookahead``), the fallback finishes at any moment, and the driver's own outcomes (a verdict,
the target's step) arrive after whatever the lanes reported meanwhile. A depth-first search
takes every possible order; each complete run is checked against the policy's guarantees, and
all runs of one scenario must verify the same steps from the same sources.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest

from dreamr_stream.engine import policy as P


@dataclass(frozen=True)
class Scenario:
    verdicts: tuple[bool, ...]  # per drafted step: accepted
    empty: tuple[bool, ...] = ()  # per drafted step: no text
    final_at: int | None = None  # the drafted step that is final (e.g. the answer)
    target_final_at: int | None = None  # the target's own step that is final
    repairable: bool = True
    fallback: str = "on"
    lookahead: int = 2
    max_steps: int = 4
    fails_after: int | None = None  # the draft lane fails after this many steps
    start: int = 0


@dataclass
class World:
    s: Scenario
    policy: P.EpochPolicy
    drafted: int = 0  # steps the draft lane wrote
    permits: int = 0
    lane_done: bool = False  # the lane wrote its last step (or failed)
    lane_ended_sent: bool = False
    fallback: int | None = None  # started, not dropped or used
    fallback_done: bool = False
    outcome: P.Observation | None = None
    log: list[P.Action] = field(default_factory=list)
    verified: list[tuple[int, str]] = field(default_factory=list)  # (index, "draft" | "target")
    free_steps: int = 0  # target steps taken from a finished fallback

    def _index(self, k: int) -> int:
        return self.s.start + k

    def lane_events(self) -> list[str]:
        ready = []
        if not self.lane_done and self.permits > 0:
            ready.append("draft")
        if self.lane_done and not self.lane_ended_sent:
            ready.append("ended")
        if self.fallback is not None and not self.fallback_done:
            ready.append("fallback")
        return ready

    def fire(self, event: str) -> None:
        if event == "draft":
            k = self.drafted
            index = self._index(k)
            self.drafted += 1
            self.permits -= 1
            final = self.s.final_at == k
            empty = k < len(self.s.empty) and self.s.empty[k]
            if final or index + 1 >= self.s.max_steps or self.drafted >= len(self.s.verdicts):
                self.lane_done = True
            if self.s.fails_after is not None and self.drafted >= self.s.fails_after:
                self.lane_done = True
            self.feed(P.Drafted(index, empty=empty, final=final))
        elif event == "ended":
            self.lane_ended_sent = True
            self.feed(P.DraftsEnded())
        elif event == "fallback":
            assert self.fallback is not None
            self.fallback_done = True
            self.feed(P.FallbackDone(self.fallback))
        elif event == "outcome":
            obs, self.outcome = self.outcome, None
            assert obs is not None
            self.feed(obs)

    def feed(self, obs: P.Observation) -> None:
        self.perform(self.policy.on(obs))

    def perform(self, actions: list[P.Action]) -> None:
        for i, action in enumerate(actions):
            self.log.append(action)
            assert not self.log[:-1] or not isinstance(self.log[-2], P.EndEpoch), "an action after the epoch's end"
            match action:
                case P.Judge(index=index):
                    assert i == len(actions) - 1, "an outcome-producing action must end its batch"
                    k = index - self.s.start
                    assert not (k < len(self.s.empty) and self.s.empty[k]), "judged an empty draft"
                    self.set_outcome(P.Judged(index, self.s.verdicts[k], self.s.repairable))
                case P.Accept(index=index):
                    self.verified.append((index, "draft"))
                    self.permits += 1
                case P.Reject():
                    pass
                case P.StartFallback(index=index):
                    assert self.fallback is None, "two fallbacks at once"
                    self.fallback, self.fallback_done = index, False
                case P.DropFallback(index=index):
                    assert self.fallback == index
                    self.fallback = None
                case P.UseFallback(index=index):
                    assert i == len(actions) - 1
                    assert self.fallback == index, "used a fallback that was not started for this step"
                    self.free_steps += self.fallback_done
                    self.fallback = None
                    self.target_step(index)
                case P.WriteTarget(index=index, repair=repair):
                    assert i == len(actions) - 1
                    assert self.fallback is None, "a fallback left running beside the target's own step"
                    if repair:  # only a judged, rejected, repairable draft is repaired
                        assert self.log[-2] == P.Reject(index) or isinstance(self.log[-2], P.DropFallback)
                    self.target_step(index)
                case P.EndEpoch():
                    pass

    def set_outcome(self, obs: P.Observation) -> None:
        assert self.outcome is None, "two outcomes outstanding"
        self.outcome = obs

    def target_step(self, index: int) -> None:
        self.verified.append((index, "target"))
        self.set_outcome(P.TargetWrote(index, final=self.s.target_final_at == index - self.s.start))


def explore(s: Scenario) -> list[World]:
    """Every complete run of scenario ``s``."""
    policy = P.EpochPolicy(s.start, max_steps=s.max_steps, fallback=s.fallback, on_gpu=False)
    root = World(s, policy, permits=s.lookahead)
    root.perform(policy.begin())
    done: list[World] = []
    stack = [root]
    while stack:
        w = stack.pop()
        if w.policy.ended and w.outcome is None:
            done.append(w)
            continue
        choices = w.lane_events() + (["outcome"] if w.outcome is not None else [])
        assert choices, f"stuck: nothing can happen (log {w.log})"
        for event in choices:
            nxt = copy.deepcopy(w)
            nxt.fire(event)
            stack.append(nxt)
        assert len(done) + len(stack) < 200_000
    return done


def check(s: Scenario) -> list[World]:
    runs = explore(s)
    assert runs
    for w in runs:
        ends = [a for a in w.log if isinstance(a, P.EndEpoch)]
        assert len(ends) == 1 and w.log[-1] == ends[0]
        indices = [i for i, _ in w.verified]
        assert indices == list(range(s.start, s.start + len(indices))), "steps verified out of order or twice"
        judged = [a.index for a in w.log if isinstance(a, P.Judge)]
        assert judged == sorted(set(judged))
        assert w.fallback is None or w.policy.ended
    # greedy decisions do not depend on timing: every run verifies the same steps, from the same lanes
    assert len({tuple(w.verified) for w in runs}) == 1, {tuple(w.verified) for w in runs}
    return runs


SCENARIOS = [
    Scenario(verdicts=(True, True, True, True)),  # everything accepted: the epoch ends at max_steps
    Scenario(verdicts=(True, True, True), final_at=2),  # the final draft accepted
    Scenario(verdicts=(True, False, True)),  # a rejection ends the epoch
    Scenario(verdicts=(False,)),  # the first draft rejected
    Scenario(verdicts=(True, True), empty=(False, True)),  # an empty draft: the target writes it
    Scenario(verdicts=(True, True, True), fails_after=1),  # the draft lane fails after one step
    Scenario(verdicts=(True,), fails_after=1, target_final_at=1),
    Scenario(verdicts=(True, True, False), lookahead=3, start=1, max_steps=5),
    Scenario(verdicts=(True, False), repairable=False),
]


@pytest.mark.parametrize("fallback", ["on", "off"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: str(s.verdicts))
def test_every_interleaving_keeps_the_guarantees(scenario: Scenario, fallback: str) -> None:
    s = Scenario(**{**scenario.__dict__, "fallback": fallback})
    runs = check(s)
    if fallback == "off":
        assert not any(isinstance(a, (P.StartFallback, P.UseFallback)) for w in runs for a in w.log)


def test_a_rejected_step_is_repaired_unless_its_fallback_is_written() -> None:
    runs = check(Scenario(verdicts=(False,), fallback="on"))
    used = [w for w in runs if any(isinstance(a, P.UseFallback) for a in w.log)]
    repaired = [w for w in runs if P.WriteTarget(0, repair=True) in w.log]
    assert used and repaired and len(used) + len(repaired) == len(runs)
    assert all(w.free_steps == 1 for w in used), "a fallback is used only once it is written"
    # nothing to repair from (the backend cannot tell where the target departs): wait for the fallback
    runs = check(Scenario(verdicts=(False,), fallback="on", repairable=False))
    assert all(any(isinstance(a, P.UseFallback) for a in w.log) for w in runs)


def test_the_epoch_ends_with_a_resync_only_when_more_steps_follow() -> None:
    (accept_all,) = {w.log[-1] for w in check(Scenario(verdicts=(True,) * 4, fallback="off"))}
    assert accept_all == P.EndEpoch(resync=False)
    (rejected,) = {w.log[-1] for w in check(Scenario(verdicts=(True, False), fallback="off"))}
    assert rejected == P.EndEpoch(resync=True)
    (final,) = {w.log[-1] for w in check(Scenario(verdicts=(False,), target_final_at=0, fallback="off"))}
    assert final == P.EndEpoch(resync=False)


def test_auto_fallback_follows_the_requests_acceptance() -> None:
    def starts(judged: int, accepted: int) -> bool:
        p = P.EpochPolicy(0, max_steps=4, fallback="auto", on_gpu=False, judged=judged, accepted=accepted)
        return any(isinstance(a, P.StartFallback) for a in p.begin())

    assert not starts(0, 0) and not starts(4, 3) and starts(4, 1)
    p = P.EpochPolicy(0, max_steps=4, fallback="auto", on_gpu=True)
    assert p.begin() == [P.StartFallback(0)]


def test_outcomes_out_of_turn_are_errors() -> None:
    p = P.EpochPolicy(0, max_steps=4, fallback="off", on_gpu=False)
    with pytest.raises(ValueError, match="unexpected outcome"):
        p.on(P.Judged(0, accepted=True))
    assert p.on(P.Drafted(0)) == [P.Judge(0)]
    with pytest.raises(ValueError, match="drafted step 2"):
        p.on(P.Drafted(2))
        p.on(P.Judged(0, accepted=True))


def test_the_enumeration_is_exhaustive_enough_to_matter() -> None:
    total = sum(len(explore(s)) for s in SCENARIOS)
    assert total > 100
