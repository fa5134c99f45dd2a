"""SAPO's settings (``SapoConfig``) and its learning-rate schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dreamr_stream.config import GenerationConfig
from dreamr_stream.sapo.rewards import RewardWeights
from dreamr_stream.training import TrainingConfig, warmup_cosine

__all__ = ["DEFAULT_GENERATION", "SapoConfig", "lr_at"]

# the task strings (step delimiter, answer prefix) where none are given: the demo task's, and
# what a Reasoner uses unless configured
DEFAULT_GENERATION = GenerationConfig()


class SapoConfig(TrainingConfig):
    """SAPO's settings. Defaults are the first SAPO recipe (step rewards only); the shipped
    draft's is ``zoo/configs/sapo.json`` (fresh puzzles, ``focus``, ``token_mean``, an unclipped
    guide and a cosine ``decay``; no anchor), and its model card has the run.

    What each setting did on the demo models (sampling temperature, learning rates, the vision
    tower, the dense term ``distill``, where groups are drawn, the ``anchor`` term, ``decay``)
    is recorded, with the commands and configs, in ``benchmarks/results/sapo_experiments.md``
    and ``benchmarks/results/sapo_anchor.md``.
    """

    steps: int = Field(default=160, ge=0)
    groups_per_step: int = 12  # informative groups per update (see max_tries)
    max_tries: int = Field(default=4, ge=1)  # at most max_tries * groups_per_step groups drawn per update
    group_size: int = Field(default=8, ge=1)
    temperature: float = Field(default=0.6, ge=0.0)
    lr: float = Field(default=1e-4, gt=0.0)
    clip_eps: float = Field(default=0.2, gt=0.0)
    kl_beta: float = Field(default=0.02, ge=0.0)
    inner_epochs: int = Field(default=2, ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    weights: RewardWeights = RewardWeights()
    pool: int = Field(default=150, ge=1)  # train prompts to draw from (the demo task's: puzzles of its train split)
    eval_prompts: int = Field(default=40, ge=0)  # held-out prompts the draft is validated on
    eval_every: int = Field(default=25, ge=1)
    ckpt_every: int = Field(default=10, ge=1)
    tau: float | None = Field(default=None, ge=0.0)  # None: what the target recommends (else 1.0)
    guide: bool = True  # the target's own step joins each group (see rollout_group)
    train_vision: bool = False  # vision tower + projector frozen (sapo_experiments.md, section 1)
    warmup: int = Field(default=10, ge=0)  # updates of linear warm-up (Adam's first steps are sign-sized)
    # updates over which the learning rate then falls to 0 on a cosine (``lr_at``); 0 keeps it
    # constant. Its own field, not ``steps``, so a run trained in stages keeps one schedule
    decay: int = 0
    verify_mode: Literal["", "judge", "likelihood"] = ""  # empty: what the target recommends
    # weight of the dense term, KL(target || draft) per token up to the first rejected one
    # (policy module docstring); 0 is step-level rewards alone
    distill: float = Field(default=0.0, ge=0.0)
    # share of groups drawn at prefixes where the current draft's greedy step is not the
    # target's (one teacher-forced forward per drawn trajectory); the rest at uniform prefixes
    focus: float = Field(default=0.0, ge=0.0, le=1.0)
    # the guide is off-policy (the target wrote it): train it on the unclipped ratio, as LUFFY
    # does, since the clip bounds how far a step the draft finds unlikely can rise per update
    guide_clip: bool = True
    # one mean over the batch's credited tokens instead of a mean per sample (policy docstring)
    token_mean: bool = False
    # weight of the anchor term: the mean NLL per token of the target's whole trajectory on
    # ``anchor_puzzles`` prompts drawn per update (rollouts.trajectory_sample)
    anchor: float = 0.0
    anchor_puzzles: int = 0
    seed: int = 0
    threads: int = Field(default=2, ge=1)
    # the task's step delimiter and answer prefix, as the Reasoner that runs the draft uses them
    generation: GenerationConfig = DEFAULT_GENERATION

    @model_validator(mode="after")
    def _trains_something(self) -> SapoConfig:
        if self.anchor < 0 or self.anchor_puzzles < 0 or self.groups_per_step < 0:
            raise ValueError("anchor, anchor_puzzles and groups_per_step must not be negative")
        if (self.anchor > 0) != (self.anchor_puzzles > 0):
            raise ValueError("the anchor term needs both a weight (anchor) and puzzles (anchor_puzzles)")
        if self.groups_per_step == 0 and self.anchor == 0:
            raise ValueError("an update needs rollout groups (groups_per_step) or the anchor term")
        if self.decay < 0 or (self.decay and self.decay <= self.warmup):
            raise ValueError("decay counts updates from the start and must end after the warm-up (or be 0)")
        return self


def lr_at(cfg: SapoConfig, step: int) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up to ``cfg.lr``, then constant
    or, with ``cfg.decay``, a cosine down to 0 at update ``decay`` (and 0 after it)::

        lr(s) = lr * (s + 1) / warmup                                   s < warmup
        lr(s) = lr * (1 + cos(pi * (s + 1 - warmup) / (decay - warmup))) / 2
    """
    # s + 1 counts the updates done: the cosine starts at the last warm-up update
    start = cfg.warmup - 1
    return warmup_cosine(step, peak=cfg.lr, warmup=cfg.warmup, start=start, end=cfg.decay - 1 if cfg.decay else start)
