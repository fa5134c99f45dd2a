"""Judge layers: a trained target learns TBVM's judge verdict from its own likelihood check."""

from dreamr_stream.zoo.judge_layers.train import (
    JudgeLayers,
    JudgeLayersConfig,
    Labels,
    Padded,
    TrunkItem,
    cache_trunk,
    judge_items,
    likelihood_labels,
    likelihood_threshold,
    main,
    pad,
    swap_cell,
    swap_word,
    train,
)

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
