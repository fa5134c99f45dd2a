"""What the two trainers share (SAPO in ``sapo/``, the zoo's supervised one in ``zoo/``): the base of
their configuration files, their learning-rate schedule, and how their checkpoints and model
folders reach the disk and come back (whole or not at all, and loaded as data, never as code)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from dreamr_stream.errors import ConfigError, CorruptFileError

__all__ = [
    "Pretrained",
    "TrainingConfig",
    "load_checkpoint",
    "save_atomic",
    "save_folder_atomic",
    "save_pretrained_atomic",
    "warmup_cosine",
]

log = logging.getLogger(__name__)


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


def _fsync(path: Path) -> None:
    """``path`` (a file or a folder) on the disk: a rename is only as durable as what it names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: object, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file: a stop mid-save never leaves a torn
    checkpoint where a resume would read it."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    _fsync(tmp)
    tmp.replace(path)
    _fsync(path.parent)


def load_checkpoint(path: Path, *, allow: Iterable[type] = ()) -> Any:
    """What ``save_atomic`` wrote to ``path``, loaded as data only (``weights_only``): tensors,
    numbers, strings and containers of them, plus the classes of ``allow``. A checkpoint is a
    pickle, and loading any other pickle can run code; one that holds more is refused with
    ``CorruptFileError``."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CorruptFileError(f"{path}: not a checkpoint of plain data, refused: {e}") from e


def _recover(dest: Path, new: Path, old: Path) -> None:
    """Finish what a stop during an earlier ``save_folder_atomic`` of ``dest`` left: a partial
    ``new`` is dropped, and an ``old`` is the folder itself again if the swap stopped halfway."""
    if new.exists():
        shutil.rmtree(new)
    if old.exists():
        if dest.exists():
            shutil.rmtree(old)
        else:
            log.warning("%s: restoring it from %s (a save stopped mid-swap)", dest, old.name)
            old.rename(dest)


def save_folder_atomic(write: Callable[[Path], None], dest: Path) -> Path:
    """``write`` a folder (``save_pretrained`` and the like) to ``dest`` whole or not at all.

    It writes into a sibling folder, syncs every file of it to the disk, then renames it into
    place, the previous ``dest`` renamed aside first and removed only once the new one is there:
    a stop before the swap leaves the previous folder untouched (and a stop in the swap's middle
    leaves it aside, where the next save of ``dest`` puts it back), and nothing is left behind.
    Returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = dest.with_name(f".{dest.name}.new")
    old = dest.with_name(f".{dest.name}.old")
    _recover(dest, new, old)
    new.mkdir()
    try:
        write(new)
        for folder, _, files in os.walk(new):
            for name in files:
                _fsync(Path(folder, name))
            _fsync(Path(folder))
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    _fsync(dest.parent)
    if old.exists():
        shutil.rmtree(old)
    return dest


class Pretrained(Protocol):
    """What writes itself into a model folder: a transformers model, processor or tokenizer."""

    def save_pretrained(self, save_directory: Any, /, *args: Any, **kwargs: Any) -> Any: ...


def save_pretrained_atomic(dest: Path, *parts: Pretrained) -> Path:
    """A model folder of ``parts`` (a model and its processor) at ``dest``, whole or not at all
    (``save_folder_atomic``)."""

    def write(folder: Path) -> None:
        for part in parts:
            part.save_pretrained(folder)

    return save_folder_atomic(write, dest)


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
