"""The type check is a test: the packages pass mypy (the engine and the core's value types
under --strict flags, pyproject.toml), and a consumer that dispatches on ``Event`` and forgets
an event type fails it: each consumer ends its ``match`` with ``assert_never``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one mypy run over every package: about a minute on 2 cores

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "dreamr_stream",
    "dreamr_app",
    "integrations/dreamr_langchain",
    "integrations/dreamr_redis",
    "integrations/dreamr_vllm",
    "integrations/dreamr_websocket",
]
# test modules whose fakes must satisfy a protocol of the package (mypy checks the assignment)
TYPED_TESTS = ["tests/test_sapo_draft.py"]  # a toy policy typed as sapo.draft.DraftPolicy
FORGETFUL = """
from typing import assert_never

from dreamr_stream.events import (
    CacheHitEvent, DraftedEvent, Event, FailedEvent, FallbackEvent, FinishedEvent, StartedEvent, VerifiedEvent,
)


def show(event: Event) -> str:
    match event:  # RejectedEvent forgotten
        case StartedEvent() | DraftedEvent() | VerifiedEvent() | FallbackEvent() | CacheHitEvent():
            return event.type
        case FinishedEvent() | FailedEvent():
            return "end"
        case _:
            assert_never(event)
"""


def test_packages_type_check_and_a_forgotten_event_does_not(tmp_path: Path) -> None:
    consumer = tmp_path / "forgetful_consumer.py"
    consumer.write_text(FORGETFUL)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            *PACKAGES,
            *TYPED_TESTS,
            str(consumer),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert errors, run.stdout + run.stderr
    assert all(line.startswith(str(consumer)) for line in errors), "\n".join(errors)
    assert any("assert_never" in line and "RejectedEvent" in line for line in errors), "\n".join(errors)
