"""What the two trainers share (SAPO in ``sapo/``, the zoo's supervised one in ``zoo/``): the base of
their configuration files and their learning-rate schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from dreamr_stream.errors import ConfigError

__all__ = ["TrainingConfig", "save_atomic", "warmup_cosine"]


class TrainingConfig(BaseModel):
    """A trainer's settings: frozen, unknown fields rejected, each value checked on construction;
    an invalid value raises ``ConfigError`` naming the field (as ``ReasonerConfig`` does)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            # one exception root: callers catch DreamrError; the pydantic detail stays attached
            raise ConfigError(f"invalid {type(self).__name__}: {e}") from e

    @classmethod
    def from_json(cls, path: Path) -> Self:
        """The settings of a JSON file of fields (an error names the file and the field)."""
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON: {e}") from e
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: a {cls.__name__} file holds one JSON object of fields")
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


def save_atomic(state: object, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file: a stop mid-save never leaves a torn
    checkpoint where a resume would read it."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def warmup_cosine(step: int, *, peak: float, warmup: int, start: int, end: int, floor: float = 0.0) -> float:
    """The learning rate of update ``step`` (0-based): a linear warm-up to ``peak``, then a cosine
    from ``peak`` at update ``start`` down to ``floor * peak`` at update ``end`` (and flat after
    it); ``end <= start`` keeps ``peak`` (no decay)::

        lr(s) = peak * (s + 1) / warmup                                          s + 1 < warmup
        lr(s) = peak * (floor + (1 - floor) * (1 + cos(pi * p)) / 2)     p = clip((s - start) / (end - start), 0, 1)

    The trainers count the cosine's start differently (SAPO from the last warm-up update,
    ``start = warmup - 1``; the zoo one update later), so each passes its own."""
    if step + 1 < warmup:
        return peak * (step + 1) / warmup
    if end <= start:
        return peak
    progress = min(1.0, max(0.0, (step - start) / (end - start)))
    # the factors in this order give exactly the floats the two schedules gave before they were one
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
