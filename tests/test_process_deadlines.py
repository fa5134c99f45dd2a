"""A stalled or crash-looping draft process never freezes requests: every call to the child has a
deadline, a child past it is killed and replaced in the background, calls fail at once while no
child serves (a draft's request goes on with the target alone), crash loops back off, a cancel
never waits for a stopped child (its call is abandoned, the child replaced, and no other request
reads the abandoned reply), and ``shutdown`` never waits for a stopped child."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from PIL import Image
from process_support import Computing, Crashing, Slow, by_question

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.backends.process import ProcessBackend
from dreamr_stream.config import CacheConfig, GenerationConfig, ReasonerConfig
from dreamr_stream.errors import BackendError
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks.grid.puzzles import make_puzzle
from dreamr_stream.types import StepSource

DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory: pytest.TempPathFactory, tiny_pair) -> Path:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("draft")
    tiny_pair[1].model.save_pretrained(folder)
    tiny_pair[1].processor.save_pretrained(folder)
    return folder


@pytest.fixture
def draft(draft_folder: Path) -> Iterator[ProcessBackend]:
    backend = ProcessBackend.from_pretrained(draft_folder, name="draft", call_timeout_s=DEADLINE_S)
    puzzle = make_puzzle(4)
    backend.close(backend.open_session(puzzle.image, puzzle.question.text()))  # it has served: no back-off
    yield backend
    backend.shutdown()


def _stop(backend: ProcessBackend) -> int:
    pid = backend.pid
    os.kill(pid, signal.SIGSTOP)
    return pid


def _fails_within(seconds: float, match: str, call: Callable[..., object], *args: object, **kwargs: object) -> None:
    start = time.monotonic()
    with pytest.raises(BackendError, match=match):
        call(*args, **kwargs)
    assert time.monotonic() - start < seconds


def _restarted(backend: ProcessBackend, restarts: int) -> float:
    """When the backend starts a child after its first ``restarts`` replacements (polled)."""
    give_up = time.monotonic() + 10
    while backend.restarts <= restarts and time.monotonic() < give_up:
        time.sleep(0.005)
    return time.monotonic()


@pytest.mark.timeout(60)
def test_a_stopped_child_fails_the_call_at_its_deadline_and_a_fresh_one_serves(draft: ProcessBackend) -> None:
    puzzle = make_puzzle(4)
    s = draft.open_session(puzzle.image, puzzle.question.text())
    before = draft.generate_step(s, max_tokens=4, stop="\n")
    first = _stop(draft)  # paused mid-request: its reply never comes
    _fails_within(
        DEADLINE_S + 1, "did not answer generate_step within 2 s", draft.generate_step, s, max_tokens=4, stop="\n"
    )
    # while the replacement starts (seconds of imports), calls fail at once: requests go alone
    _fails_within(0.5, "not running", draft.open_session, puzzle.image, puzzle.question.text())
    draft.close(s)  # never blocks
    draft.ready()
    fresh = draft.open_session(puzzle.image, puzzle.question.text())
    assert draft.pid != first and draft.restarts == 1
    assert draft.generate_step(fresh, max_tokens=4, stop="\n") == before
    # a stopped child does not read either: a send too big for the pipe's buffer has the deadline too
    _stop(draft)
    big = Image.new("RGB", (1500, 1500), (7, 8, 9))  # megabytes pickled
    _fails_within(DEADLINE_S + 1, "did not answer open_session", draft.open_session, big, "q?")


@pytest.mark.timeout(60)
def test_shutdown_does_not_wait_for_a_stopped_child(draft: ProcessBackend) -> None:
    proc = draft._child.proc
    _stop(draft)
    start = time.monotonic()
    draft.shutdown()
    assert time.monotonic() - start < 2.0 and proc.returncode == -signal.SIGKILL


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_request_whose_draft_process_is_stopped_finishes_with_the_target_alone(
    draft: ProcessBackend, tiny_pair
) -> None:  # type: ignore[no-untyped-def]
    config = ReasonerConfig(cache=CacheConfig(enabled=False), generation=GenerationConfig(max_steps=3))
    puzzle = make_puzzle(6)
    r = Reasoner(tiny_pair[0], draft, config=config)
    _stop(draft)
    start = time.monotonic()
    result = await r.ainvoke(puzzle.image, puzzle.question.text())
    assert time.monotonic() - start < DEADLINE_S + 3
    assert "did not answer" in (result.stats.target_alone_reason or ""), result.stats
    assert result.steps and all(s.source is StepSource.TARGET for s in result.steps)


def _scripted(monkeypatch: pytest.MonkeyPatch, token_delay_s: float, call_timeout_s: float) -> ProcessBackend:
    """A scripted draft (``process_support.by_question``) in a child process: it starts in about
    a second (no torch), and its steps name their request."""
    tests = str(Path(__file__).parent)  # the child imports the backend from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (tests, os.environ.get("PYTHONPATH")))))
    return ProcessBackend(Slow(token_delay_s), call_timeout_s=call_timeout_s)


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_cancel_while_the_draft_process_is_stopped_returns_at_once_and_the_child_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draft = _scripted(monkeypatch, 0.0, DEADLINE_S)
    r = Reasoner(
        ScriptedBackend(by_question, name="target"), draft, config=ReasonerConfig(cache=CacheConfig(enabled=False))
    )
    image = Image.new("RGB", (8, 8))
    try:
        with_draft = await r.ainvoke(image, "A?")
        assert not with_draft.stats.target_alone_reason
        stopped = draft._child.proc
        _stop(draft)
        cancel_at = time.monotonic() + 0.3
        with anyio.move_on_after(0.3):  # its draft call is in the stopped child: abandoned, not awaited
            await r.ainvoke(image, "A?")
        assert time.monotonic() - cancel_at < 0.5  # not the call's deadline (2 s)
        # the child, whose reply would now be out of step, is killed after the grace (1 s) and
        # replaced in the background
        assert _restarted(draft, 0) - cancel_at < 1.0 + 1.0
        assert stopped.wait(5) == -signal.SIGKILL
        draft.ready()
        again = await r.ainvoke(image, "A?")
        assert not again.stats.target_alone_reason and draft.restarts == 1
        assert [(s.text, s.source) for s in again.steps] == [(s.text, s.source) for s in with_draft.steps]
    finally:
        r.close()
        draft.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_an_abandoned_call_s_reply_never_reaches_another_request(monkeypatch: pytest.MonkeyPatch) -> None:
    # each draft call takes 0.75 s (three words): a cancel lands in the middle of one
    draft = _scripted(monkeypatch, 0.25, 10.0)
    r = Reasoner(
        ScriptedBackend(by_question, name="target"), draft, config=ReasonerConfig(cache=CacheConfig(enabled=False))
    )
    image = Image.new("RGB", (8, 8))
    left: list[float] = []

    async def cancelled() -> None:
        with anyio.move_on_after(0.3):
            await r.ainvoke(image, "A?")
        left.append(time.monotonic())

    try:
        async with anyio.create_task_group() as tg:
            cancel_at = time.monotonic() + 0.3
            tg.start_soon(cancelled)
            await anyio.sleep(0.1)  # A's first draft step is in the child by now
            result = await r.ainvoke(image, "B?")  # its draft calls queue behind A's
        # A left at once; B got its own replies (A's, read for nobody, named A), all from the draft
        assert left[0] - cancel_at < 0.2
        assert [s.text for s in result.steps] == ["B? step 0", "B? step 1", "Answer: 4"]
        assert all(s.source is StepSource.DRAFT for s in result.steps) and not result.stats.target_alone_reason
        assert draft.restarts == 0  # it answered within the grace: a healthy child is kept
    finally:
        r.close()
        draft.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_starved_child_that_keeps_computing_is_kept_past_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    # each draft step costs 3 words x 0.8 s of CPU: the reply comes well after the 1 s grace,
    # as a draft's step does on cores a busy server keeps; the child computes all along
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (tests, os.environ.get("PYTHONPATH")))))
    draft = ProcessBackend(Computing(0.8), call_timeout_s=20.0)
    r = Reasoner(
        ScriptedBackend(by_question, name="target"), draft, config=ReasonerConfig(cache=CacheConfig(enabled=False))
    )
    image = Image.new("RGB", (8, 8))
    try:
        draft.ready()
        pid = draft.pid
        cancel_at = time.monotonic() + 0.3
        with anyio.move_on_after(0.3):  # the caller leaves mid-step: it does not wait for the child
            await r.ainvoke(image, "A?")
        assert time.monotonic() - cancel_at < 0.5
        await anyio.sleep(2.5)  # past the grace, still computing the abandoned step
        assert draft.restarts == 0 and draft.pid == pid
        # the same child answers the next request once the abandoned step is done
        later = await r.ainvoke(image, "B?")
        assert [s.text for s in later.steps] == ["B? step 0", "B? step 1", "Answer: 4"]
        assert not later.stats.target_alone_reason and draft.restarts == 0 and draft.pid == pid
    finally:
        r.close()
        draft.shutdown()


@pytest.mark.timeout(60)
def test_a_crash_loop_backs_off_and_calls_fail_at_once_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tests = str(Path(__file__).parent)  # the child imports the crashing backend from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (tests, os.environ.get("PYTHONPATH")))))
    switch = tmp_path / "crash"
    switch.write_text("call")  # the child starts, then dies at every call
    backend = ProcessBackend(Crashing(switch), backoff_s=(0.4, 10.0))
    image = Image.new("RGB", (8, 8))
    delays = []
    try:
        for _ in range(3):
            with pytest.raises(BackendError, match="died during open_session"):
                backend.open_session(image, "q?")
            lost, started = time.monotonic(), backend.restarts
            _fails_within(0.2, "next restart in", backend.open_session, image, "q?")
            delays.append(_restarted(backend, started) - lost)
            backend.ready()
        # each wait doubles (0.4, 0.8, 1.6 s), not one restart per request
        for delay, backoff in zip(delays, (0.4, 0.8, 1.6), strict=True):
            assert backoff <= delay < backoff + 0.4, delays
        switch.unlink()  # fixed: it answers, which resets the back-off
        assert backend.open_session(image, "q?").length == 1
        switch.write_text("start")  # now it dies while starting
        started = backend.restarts
        os.kill(backend.pid, signal.SIGKILL)
        backend._child.proc.wait()
        _fails_within(0.2, "not running", backend.open_session, image, "q?")  # found dead: restarted at once
        spawns = [_restarted(backend, started + n) for n in range(4)]
        _fails_within(0.2, "failed to start: .*exit code 3", backend.open_session, image, "q?")
        gaps = [b - a for a, b in itertools.pairwise(spawns)]
        assert len(gaps) == 3 and gaps[0] >= 0.4 and gaps[0] < gaps[1] < gaps[2], gaps
    finally:
        backend.shutdown()
