"""Judge layers: a trained target learns TBVM's judge verdict from its own likelihood check.

The likelihood mode accepts a step when every one of its tokens is probable under the target
(``min_i p(token_i) >= tau / (1 + tau)``); that check is exact, and on the demo it agrees with
"the target would have written this step" on 99.9% of the drafts' steps. The judge mode asks
the same model for one ` yes` / ` no` after ``Check:``, and the demo target cannot answer: it
forms each next-token prediction only in its last layers, so none are left to compare a step's
tokens with those predictions and gather the comparisons at the verdict
(``benchmarks/results/judge_stage.md``).

So this stage appends decoder layers on top of the frozen target (``build.grow_decoder``, the
identity at the start) and trains only them, with labels the target itself gives:

* the verdict: the likelihood mode's decision on the same candidate, at the target's recommended
  likelihood tau (a distillation of the exact check into the judge prompt: no label noise, and
  the judge learns what FPSR needs, "would the target have written this");
* per candidate token, whether that token passes the check (an error flag after the new layer
  ``flag_after``), and after the next one whether every counted token so far passed (so the
  gathering is learned at every candidate position, not only at the verdict);
* at every position, the previous position's greedy token (after the first new layer: it
  teaches the copy the comparison needs);
* at every other position, the frozen target's next-token distribution (a KL term), so that the
  grown target writes what it wrote before.

The frozen layers compute the same thing at every step, so they run once: ``cache_trunk`` keeps
their last hidden states for every training item, and a training step runs only the new layers
(about 20x cheaper than a forward and backward through the whole target). ``JudgeLayers`` on a
cached trunk computes exactly what the grown model computes (``tests/test_judge_layers.py``).

New layers on top alone cannot flag a misread shape: the demo target's layer 17 replaces a written
shape with the one the image shows (``benchmarks/written_token_probe.py``). ``trainable_top``
trains the target's own top layers with the new ones, the trunk cached below them (the labels
and the KL still from the frozen target's last layer), so the written token can reach the check:
that is how the shipped ``target-judge`` was made.
"""

from dreamr_stream.zoo.judge_layers.data import (
    Labels,
    judge_items,
    likelihood_labels,
    likelihood_threshold,
    swap_cell,
    swap_word,
)
from dreamr_stream.zoo.judge_layers.model import JudgeLayers, Padded, TrunkItem, cache_trunk, pad
from dreamr_stream.zoo.judge_layers.train import JudgeLayersConfig, main, train

__all__ = [
    "JudgeLayers",
    "JudgeLayersConfig",
    "Labels",
    "Padded",
    "TrunkItem",
    "cache_trunk",
    "judge_items",
    "likelihood_labels",
    "likelihood_threshold",
    "main",
    "pad",
    "swap_cell",
    "swap_word",
    "train",
]
