"""SAPO's settings (``SapoConfig``, with what each recipe measured) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dreamr_stream.sapo.rewards import RewardWeights

__all__ = ["SapoConfig", "lr_at"]


@dataclass
class SapoConfig:
    """Defaults are the first SAPO recipe (step rewards only, 81.4% below); the shipped draft's
    is ``zoo/configs/sapo.json`` (fresh puzzles, ``focus``, ``token_mean``, unclipped guide and
    a cosine ``decay``, all explained below; no anchor), and its model card has the run.

    What we measured on the demo models, acceptance of the greedy draft step at the target's
    prefixes of 20 validation puzzles: 8 groups of 4 sampled at temperature 1.0 moved nothing in
    60 updates at lr 1e-4 and collapsed perception at 1e-3 (60% -> 13% in 20 updates, vision
    tower trainable); batched groups of 8 at temperature 0.6 with the target's step in each
    group and the vision tower frozen started to help; at lr 3e-4 or 5e-4 acceptance still fell
    (64% -> 55% and -> 45% in 20 updates) while lr 1e-4 with two epochs per batch raised it
    steadily (64% -> 72% in 80 updates, then a plateau). At 1.0 a 2-layer draft's samples are
    full of improbable tokens whose large negative gradients swamp the signal.

    The dense term (``distill``, KL(target || draft) per token up to the first rejected token)
    did not beat that plateau, on 40 validation puzzles (227 prefixes, 74.4% at the start):
    weight 1 at lr 1e-4 reached 79.7% at update 20 and 77.5% at 40; weight 5 at lr 3e-4
    diverged (63.9% at update 20, the per-token KL to the target rising from 0.07 to 0.23);
    weight 5 at lr 1e-4 went 76.7%, 78.0%, 78.4%, 75.3% at updates 25-100, the pace of the
    step rewards alone. So it stays off by default; the signal per update, not its density,
    looks like the limit (an update draws ~35 groups to find 12 where the samples disagree).

    Where the groups are drawn (exact greedy steps at the target's prefixes of 300 validation
    puzzles, 1,679 prefixes: SFT draft 73.2%, shipped SAPO draft 81.4%). The draft's misses are
    nearly all one rule: on two-target questions it bumps the first target's count at every
    match. Continued SFT (400 steps, vision frozen) reaches 93.1%, so the 2-layer draft can
    learn the rule; capacity is not the limit. Groups at prefixes the draft gets wrong
    (``focus``) out of a fixed pool of 300 or 1,000 puzzles fixed the pool's own prefixes
    (71% -> 81% of 5,700 in 40 updates) and validation much less (79.9% at 50): the draft
    learnt puzzles, not the rule. Each group from a fresh puzzle (``pool`` 20,000, the
    trajectory computed on first draw) with 24 groups of 6, ``focus`` 0.9, ``token_mean`` and an
    unclipped guide reached 82.8% in 20 updates (7 CPU minutes; the shipped recipe took 160
    updates, 27 minutes, for 81.4%), then stalled: 82.0% at 50, the draft having swapped its
    habit (now bumping the second target's count) rather than learnt to bind, since groups at
    missed prefixes all push one way and groups it already gets right carry no advantage.
    Neither ``focus`` 0.5 from there (82.8% at 50) nor the dense term from the start (80.9%,
    80.3% at 20, 40) moved past it. lr 1e-4 and 2e-4 moved alike in 20 updates; 4e-4 collapsed
    (74% -> 44% on 40 puzzles, per-token KL to the SFT draft 0.03 -> 0.5-1.0). Step rewards
    carry about one target step per group; continued SFT sees ~200 per batch, which is the gap.

    The anchor term (``anchor`` x the mean NLL per token of the target's whole trajectories on
    ``anchor_puzzles`` fresh train puzzles per update, as PPO-ptx and SRFT mix a supervised loss
    into RL) gives the rule both kinds of cells at once. On the fresh-puzzle recipe above (same
    300 validation puzzles): anchor 1 on 8 puzzles, 82.6 / 83.2 / 82.8 / 83.6% at updates
    10-40; anchor 5 on 16 puzzles, 83.3 / 83.6 / 84.2 / 84.0 / 84.3 / 84.6 / 85.2 / 84.5% at
    10-80, then 86.3 / 84.0 / 85.3% at 100 / 120 / 140. The same anchor with no rollouts at all
    (``groups_per_step`` 0; 1 s per update, not 12) reached 81.1 / 83.4 / 83.4 / 84.5 / 84.9 /
    84.3 / 85.2% at 10 / 20 / 40 / 80 / 100 / 120 / 140: what the rollouts reached with it. At
    lr 3e-4 and 32 anchor puzzles: anchor alone 82.9 / 82.6 / 81.4% at 20 / 40 / 60, with
    rollouts 82.6 / 83.1 / 83.3%. So on this task the step rewards add nothing that imitating the
    target's trajectories does not, and why is plain: TBVM's likelihood mode accepts a step when
    each token is likely under the target, the target's greedy step is such a step, and FPSR
    only ever asks the draft for a step after a prefix the target verified, so there are no
    states of the draft's own that imitation would miss. With it (anchor 5 on 16 puzzles, 100
    updates) SAPO reached +15 points over the SFT draft on the test split, as did the anchor
    alone (``benchmarks/results/sapo_anchor.md``).

    Learning-rate decay (``decay``) showed the step rewards' stall above was the constant
    rate's noise, not their signal running out: the fresh-puzzle recipe with no anchor and a
    cosine to 0 at update 60 reached 82.4 / 84.0 / 84.5% at 20 / 40 / 60 on the same 300
    validation puzzles (constant rate: 82.8 / 82.0% at 20 / 50), and on the test split 85.0%,
    +15.0 over the SFT draft, from the step rewards alone
    (``benchmarks/configs/sapo-fresh-cosine.json``, 24 CPU minutes); with the cosine over 100
    updates, 84.9% on validation and 86.1% on test (+16.1): the shipped recipe, whose gain is
    the RL's own. The anchor alone gained nothing from it: 83.2 / 85.4 / 85.3% at 40 / 80 / 140
    with a cosine at 1e-4 (constant: 85.2% at 140), 80.5 / 84.6 / 85.4% from a 3e-4 peak.
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
    train_vision: bool = False  # vision tower + projector frozen (see above)
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
