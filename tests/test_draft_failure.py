"""The draft is an optimisation, not a dependency: when it fails mid-request (its process killed,
its backend raising) the request finishes with the target's own steps, and the next request
speculates again (with a restarted draft process)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import pytest
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.backends.process import ProcessBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks.grid.puzzles import make_puzzle, split_seed
from dreamr_stream.types import ReasoningResult, StepSource

TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]


class FailingDraft:
    """A draft backend whose ``generate_step`` raises a plain exception (not a BackendError, as
    a torch error or a server's would be) from its ``fail_at``-th call on, while ``failing``."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.failing = True
        self.steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate_step(self, session: Any, **kwargs: Any) -> Any:
        self.steps += 1
        if self.failing and self.steps >= self.fail_at:
            raise RuntimeError("injected draft failure")
        return self.inner.generate_step(session, **kwargs)


def went_alone(result: ReasoningResult) -> bool:
    """The request finished, its draft's failure in the stats, and its last steps the target's
    own (drafts written before the failure may still have been verified after it)."""
    return (
        result.stats.target_alone_from is not None
        and "draft failed" in (result.stats.target_alone_reason or "")
        and result.steps[-1].source is StepSource.TARGET
        and result.steps[-1].is_final
        and result.answer is not None
    )


def speculated(result: ReasoningResult) -> bool:
    return result.stats.target_alone_from is None and any(s.source is StepSource.DRAFT for s in result.steps)


def test_a_draft_raising_any_error_degrades_to_the_target_and_the_next_request_speculates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def draft_policy(question: str, prefix: Sequence[str]) -> str | None:
        return TARGET[len(prefix)] if len(prefix) < len(TARGET) else None

    draft = FailingDraft(ScriptedBackend(draft_policy, name="draft"), fail_at=2)
    r = Reasoner(ScriptedBackend(TARGET, name="target"), draft, config=ReasonerConfig(cache=CacheConfig(enabled=False)))
    image = Image.new("RGB", (32, 32))
    with caplog.at_level(logging.WARNING):
        result = r.invoke(image, "how many?")
    assert went_alone(result) and [s.text for s in result.steps] == TARGET
    # the step drafted before the failure was verified; every later one is the target's
    assert [s.source for s in result.steps] == [StepSource.DRAFT] + [StepSource.TARGET] * 3
    assert "RuntimeError: injected draft failure" in (result.stats.target_alone_reason or "")
    assert sum("the draft failed" in rec.message for rec in caplog.records) == 1  # one warning
    draft.failing = False
    again = r.invoke(image, "how many?")
    assert speculated(again) and [s.text for s in again.steps] == TARGET
    r.close()


# ---------------------------------------------------------------------- the shipped models
@pytest.fixture(scope="module")
def demo() -> Iterator[Reasoner]:
    r = Reasoner.demo(draft_process=True)  # the draft in a child process, as on any CPU
    yield r
    r.close()


def no_cache(r: Reasoner) -> ReasonerConfig:
    return r.config.model_copy(update={"cache": CacheConfig(enabled=False)})


def ask(i: int) -> tuple[Image.Image, str]:
    p = make_puzzle(split_seed("test", i))
    return p.image, p.question.text()


@pytest.mark.slow
def test_shipped_draft_process_killed_mid_request(demo: Reasoner, caplog: pytest.LogCaptureFixture) -> None:
    assert demo.draft is not None
    draft = demo.draft.backend
    assert isinstance(draft, ProcessBackend)
    first_pid = draft.pid
    config = no_cache(demo)

    async def killed_after_the_first_step() -> ReasoningResult:
        killed = False
        async for event in demo.astream_events(*ask(0), config=config):
            if event.type in ("verified", "fallback") and not killed:
                os.kill(first_pid, signal.SIGKILL)  # mid-request: the draft is drafting ahead
                killed = True
            if event.type == "finished":
                return event.result
            assert event.type != "failed", event
        raise AssertionError("no finished event")

    with caplog.at_level(logging.WARNING):
        result = anyio.run(killed_after_the_first_step)
    assert went_alone(result), result.stats
    assert any("restarting it" in rec.message for rec in caplog.records)
    draft.ready()  # replaced in the background; requests meanwhile go alone at once
    again = demo.invoke(*ask(1), config=config)
    assert draft.pid != first_pid and draft.restarts == 1
    assert speculated(again), again.stats


@pytest.mark.slow
def test_shipped_draft_backend_erroring_mid_request(demo: Reasoner) -> None:
    assert demo.draft is not None
    failing = FailingDraft(demo.draft.backend, fail_at=3)
    r = Reasoner(demo.target.backend, failing, config=no_cache(demo))
    try:
        result = r.invoke(*ask(2))
        assert went_alone(result), result.stats
        failing.failing = False  # the draft's server is back
        assert speculated(r.invoke(*ask(3))), "the next request should speculate again"
    finally:
        r.close()
