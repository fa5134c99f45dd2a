"""SAPO's settings (``SapoConfig``) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dreamr_stream.sapo.rewards import RewardWeights

__all__ = ["SapoConfig", "lr_at"]


@dataclass
class SapoConfig:
    """SAPO's settings. Defaults are the first SAPO recipe (step rewards only); the shipped
    draft's is ``zoo/configs/sapo.json`` (fresh puzzles, ``focus``, ``token_mean``, an unclipped
    guide and a cosine ``decay``; no anchor), and its model card has the run.

    What each setting did on the demo models (sampling temperature, learning rates, the vision
    tower, the dense term ``distill``, where groups are drawn, the ``anchor`` term, ``decay``)
    is recorded, with the commands and configs, in ``benchmarks/results/sapo_experiments.md``
    and ``benchmarks/results/sapo_anchor.md``.
    """

    steps: int = 160
    groups_per_step: int = 12  # informative groups per update (see max_tries)
    max_tries: int = 4  # at most max_tries * groups_per_step groups drawn per update
    group_size: int = 8
    temperature: float = 0.6
    lr: float = 1e-4
    clip_eps: float = 0.2
    kl_beta: float = 0.02
    inner_epochs: int = 2
    max_grad_norm: float = 1.0
    weights: RewardWeights = field(default_factory=RewardWeights)
    pool: int = 150  # train puzzles to draw from; a trajectory is computed on first draw
    eval_prompts: int = 40
    eval_every: int = 25
    ckpt_every: int = 10
    tau: float | None = None  # None: what the target recommends (else 1.0)
    guide: bool = True  # the target's own step joins each group (see rollout_group)
    train_vision: bool = False  # vision tower + projector frozen (sapo_experiments.md, section 1)
    warmup: int = 10  # updates of linear learning-rate warm-up (Adam's first steps are sign-sized)
    # updates over which the learning rate then falls to 0 on a cosine (``lr_at``); 0 keeps it
    # constant. Its own field, not ``steps``, so a run trained in stages keeps one schedule
    decay: int = 0
    verify_mode: str = ""  # "judge" | "likelihood"; empty: what the target recommends
    # weight of the dense term, KL(target || draft) per token up to the first rejected one
    # (policy module docstring); 0 is step-level rewards alone
    distill: float = 0.0
    # share of groups drawn at prefixes where the current draft's greedy step is not the
    # target's (one teacher-forced forward per drawn trajectory); the rest at uniform prefixes
    focus: float = 0.0
    # the guide is off-policy (the target wrote it): train it on the unclipped ratio, as LUFFY
    # does, since the clip bounds how far a step the draft finds unlikely can rise per update
    guide_clip: bool = True
    # one mean over the batch's credited tokens instead of a mean per sample (policy docstring)
    token_mean: bool = False
    # weight of the anchor term: the mean NLL per token of the target's whole trajectory on
    # ``anchor_puzzles`` puzzles drawn per update (rollouts.trajectory_sample)
    anchor: float = 0.0
    anchor_puzzles: int = 0
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.anchor < 0 or self.anchor_puzzles < 0 or self.groups_per_step < 0:
            raise ValueError("anchor, anchor_puzzles and groups_per_step must not be negative")
        if (self.anchor > 0) != (self.anchor_puzzles > 0):
            raise ValueError("the anchor term needs both a weight (anchor) and puzzles (anchor_puzzles)")
        if self.groups_per_step == 0 and self.anchor == 0:
            raise ValueError("an update needs rollout groups (groups_per_step) or the anchor term")
        if self.decay < 0 or (self.decay and self.decay <= self.warmup):
            raise ValueError("decay counts updates from the start and must end after the warm-up (or be 0)")


def lr_at(cfg: SapoConfig, step: int) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up to ``cfg.lr``, then constant
    or, with ``cfg.decay``, a cosine down to 0 at update ``decay`` (and 0 after it)::

        lr(s) = lr * (s + 1) / warmup                                   s < warmup
        lr(s) = lr * (1 + cos(pi * (s + 1 - warmup) / (decay - warmup))) / 2
    """
    if step + 1 < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if not cfg.decay:
        return cfg.lr
    done = min(1.0, (step + 1 - cfg.warmup) / (cfg.decay - cfg.warmup))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * done))
