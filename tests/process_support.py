"""Backends for a ``ProcessBackend``'s child: ones that crash its process, as a crash in native
code would, and a slow one whose steps name their request. The child imports this module by
name: a test puts this folder on its ``PYTHONPATH``."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamr_stream.backends.base import StepOutput
from dreamr_stream.backends.fake import FakeSession, ScriptedBackend

SCRIPT = ["read row one", "Answer: 4"]


def _crash_when(switch: Path, mode: str) -> None:
    if switch.is_file() and switch.read_text() == mode:
        os._exit(3)


class _CrashingBackend(ScriptedBackend):
    """A scripted backend whose process exits at each call while ``switch`` says ``call``."""

    def __init__(self, switch: Path) -> None:
        super().__init__(SCRIPT, name="draft")
        self.switch = switch

    def open_session(self, image: Any, question: str, *, seed: int = 0) -> FakeSession:
        _crash_when(self.switch, "call")
        return super().open_session(image, question, seed=seed)

    def generate_step(self, session: FakeSession, **kwargs: Any) -> StepOutput:
        _crash_when(self.switch, "call")
        return super().generate_step(session, **kwargs)


@dataclass(frozen=True)
class Crashing:
    """Builds a ``_CrashingBackend``; its process exits while starting when ``switch`` says
    ``start``. Without the file it works."""

    switch: Path

    def __call__(self) -> ScriptedBackend:
        _crash_when(self.switch, "start")
        return _CrashingBackend(self.switch)


def by_question(question: str, prefix: Sequence[str]) -> str | None:
    """Two steps that name the question they answer, then the answer: a reply meant for one
    request is told from another's."""
    if len(prefix) < 2:
        return f"{question} step {len(prefix)}"
    return "Answer: 4" if len(prefix) == 2 else None


@dataclass(frozen=True)
class Slow:
    """Builds a scripted backend (``by_question``) that takes ``token_delay_s`` per word."""

    token_delay_s: float

    def __call__(self) -> ScriptedBackend:
        return ScriptedBackend(by_question, name="draft", token_delay_s=self.token_delay_s)


class _ComputingBackend(ScriptedBackend):
    """A scripted backend whose every token costs ``token_delay_s`` of computing, not sleeping:
    a draft on cores that a busy server keeps, slow but never idle."""

    def _token_delay(self) -> None:
        end = time.thread_time() + self.token_delay_s
        while time.thread_time() < end:
            pass


@dataclass(frozen=True)
class Computing:
    """Builds a ``_ComputingBackend`` (``by_question``) taking ``token_cpu_s`` of CPU per word."""

    token_cpu_s: float

    def __call__(self) -> ScriptedBackend:
        return _ComputingBackend(by_question, name="draft", token_delay_s=self.token_cpu_s)
