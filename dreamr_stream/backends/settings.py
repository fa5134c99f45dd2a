"""The one reader of a model folder's ``dreamr.json``: the settings that travel with its weights.

A model folder may hold a ``dreamr.json`` beside the weights::

    {"task": "grid",
     "judge": {"suffix": "Check:", "positive": " yes", "negative": " no"},
     "verification": {"mode": "likelihood", "tau": 0.25, "taus": {"judge": 0.18, "likelihood": 0.25}}}

* ``task``: the task the model was trained on (``dreamr_stream.tasks``);
* ``judge``: the judge template its training taught (``JudgeTemplate``);
* ``verification``: the TBVM settings measured best for it as a target
  (``VerificationConfig.recommended`` reads it, including the optional per-mode ``taus``).

Every backend of a model (in this process, in a child process, served elsewhere with
``settings_from``) reads it here, so the file has one meaning. This module imports no torch: a
served model's settings are read without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dreamr_stream.config import JudgeTemplate, SchedulingConfig
from dreamr_stream.errors import ConfigError

__all__ = ["SETTINGS_FILE", "ModelSettings", "read_settings"]

SETTINGS_FILE = "dreamr.json"


@dataclass(frozen=True)
class ModelSettings:
    """A model folder's ``dreamr.json``, read and checked; a folder without one has the defaults.

    ``extra`` keeps any other key as it was written (a newer file read by older code)."""

    task: str | None = None
    judge: JudgeTemplate | None = None
    verification: Mapping[str, Any] = field(default_factory=dict)
    # the speculation schedule measured for this model where it is served (``dreamr calibrate
    # --schedule``): ``SchedulingConfig.schedule``'s rows, as JSON objects
    schedule: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the file holds them (keys that were absent stay absent)."""
        out: dict[str, Any] = dict(self.extra)
        if self.task is not None:
            out["task"] = self.task
        if self.judge is not None:
            out["judge"] = self.judge.model_dump()
        if self.verification:
            out["verification"] = dict(self.verification)
        if self.schedule:
            out["schedule"] = [dict(row) for row in self.schedule]
        return out


def read_settings(folder: str | Path) -> ModelSettings:
    """The settings in ``folder/dreamr.json``; defaults when there is no such file.

    Raises ``ConfigError`` naming the file when it is not valid JSON or a value has the wrong
    shape (a model loaded with a misread judge template would judge wrongly without a sign)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return ModelSettings()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    task, judge, verification = data.pop("task", None), data.pop("judge", None), data.pop("verification", {})
    if task is not None and not isinstance(task, str):
        raise ConfigError(f"{path}: 'task' must be a task name, found {task!r}")
    if judge is not None and not isinstance(judge, dict):
        raise ConfigError(f"{path}: 'judge' must be an object (suffix, positive, negative), found {judge!r}")
    if not isinstance(verification, dict):
        raise ConfigError(f"{path}: 'verification' must be an object (mode, tau, taus), found {verification!r}")
    try:
        template = JudgeTemplate(**judge) if judge is not None else None
    except ConfigError as e:
        raise ConfigError(f"{path}: 'judge': {e}") from e
    schedule = data.pop("schedule", [])
    try:  # checked as the config will check it, so that a bad file fails here, naming itself
        SchedulingConfig.model_validate({"schedule": schedule or None})
    except (ConfigError, ValidationError) as e:
        raise ConfigError(f"{path}: 'schedule' must be rows of in_flight, lookahead (and mode): {e}") from e
    rows = tuple(dict(row) for row in schedule)
    return ModelSettings(task=task, judge=template, verification=verification, schedule=rows, extra=data)
