"""SAPO asks the target for evidence through ``StepScorer``: any backend that gives log-probs of a
step can stand behind it (here a scripted one)."""

from __future__ import annotations

import random

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.sapo.draft import TransformersDraft
from dreamr_stream.sapo.rewards import RewardWeights
from dreamr_stream.sapo.rollouts import RolloutPrompt, StepScore, rollout_group
from dreamr_stream.tasks.grid.puzzles import make_puzzle


class ScriptedScorer:
    """Evidence for the target's own step only; every call recorded."""

    def __init__(self, backend: TransformersBackend, steps: list[str], k: int) -> None:
        self.backend, self.right = backend, steps[k]
        self.calls: list[tuple[list[str], list[str], bool]] = []

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text)

    def score_steps(
        self, image: object, question: str, prefix: list[str], texts: list[str], *, judge: bool
    ) -> list[StepScore]:
        self.calls.append((prefix, list(texts), judge))
        return [StepScore(float(t == self.right), float(t != self.right), [0.0]) for t in texts]


def test_rollout_group_takes_the_targets_evidence_through_the_scorer(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    _, draft = tiny_pair
    puzzle = make_puzzle(5)
    steps, k = puzzle.steps(), 1
    scorer = ScriptedScorer(draft, steps, k)
    group = rollout_group(
        scorer,
        TransformersDraft(draft),
        RolloutPrompt(puzzle.image, puzzle.question.text(), steps),
        k,
        group_size=3,
        temperature=1.5,
        weights=RewardWeights(),
        rng=random.Random(0),
        max_step_tokens=8,
        guide=True,
    )
    # one call for the whole group, after the verified prefix, judge evidence (no verifier given)
    assert scorer.calls == [(steps[:k], [s.meta["text"] for s in group], True)]
    assert group[-1].meta["guide"] and group[-1].meta["p_pos"] == 1.0
    assert all(s.meta["p_pos"] == float(s.meta["text"] == steps[k]) for s in group)
