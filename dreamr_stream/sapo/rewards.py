"""SAPO rewards and advantages: pure functions, the formulas in one place.

A sampled draft step ``s`` at a prefix of the target's trajectory, whose own next step is ``t``,
is scored by the target in ONE forward (the TBVM judge pass), which gives the verdict
probabilities and the target's log-probabilities of ``s``'s tokens. Then::

    faith(s)   = p_pos / (p_pos + p_neg)                      TBVM evidence, in [0, 1]
    agree(s)   = 1[s == t]                                    the target's own step, exactly
    excess(s)  = max(0, n_tokens(s) - n_tokens(t)) / n_tokens(t)
    reward(s)  = w_faith * faith + w_agree * agree - w_length * excess

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)              over the G samples of one group

so a group whose samples all score alike teaches nothing (A = 0), and a step is pushed up only
relative to its siblings at the same prefix (GRPO's group normalisation, per step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import Field

from dreamr_stream.training import TrainingConfig

__all__ = ["RewardWeights", "group_advantages", "step_reward"]


class RewardWeights(TrainingConfig):
    """The weights of the reward's three terms (module docstring)."""

    faith: float = Field(default=1.0, ge=0.0)
    agree: float = Field(default=1.0, ge=0.0)
    length: float = Field(default=0.5, ge=0.0)


DEFAULT_WEIGHTS = RewardWeights()


def step_reward(
    *,
    p_pos: float,
    p_neg: float,
    text: str,
    n_tokens: int,
    target_step: str,
    target_tokens: int,
    weights: RewardWeights = DEFAULT_WEIGHTS,
) -> float:
    total = p_pos + p_neg
    faith = p_pos / total if total > 0 and math.isfinite(total) else 0.0
    agree = 1.0 if text.strip() == target_step.strip() else 0.0
    excess = max(0, n_tokens - target_tokens) / max(1, target_tokens)
    return weights.faith * faith + weights.agree * agree - weights.length * excess


def group_advantages(rewards: Sequence[float], eps: float = 1e-4) -> list[float]:
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    if std < 1e-8:  # all alike: no signal (and no float noise posing as one)
        return [0.0] * n
    return [(r - mean) / (std + eps) for r in rewards]
