"""The draft served from its own process behaves exactly like the same backend in this one."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dreamr_stream.backends import registry
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.process import ProcessBackend, RemoteSession
from dreamr_stream.config import CacheConfig, GenerationConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.errors import BackendError, ConfigError, ModelLoadError
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks.grid.puzzles import make_puzzle


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_pair) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    out = {}
    for name, backend in zip(("target", "draft"), tiny_pair, strict=True):
        out[name] = tmp_path_factory.mktemp(name)
        backend.model.save_pretrained(out[name])
        backend.processor.save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def remote(folders: dict[str, Path]) -> Iterator[ProcessBackend]:
    backend = ProcessBackend.from_pretrained(folders["draft"], name="draft")
    yield backend
    backend.shutdown()
    assert not backend.alive


def test_every_method_matches_the_in_process_backend(remote: ProcessBackend, folders: dict[str, Path]) -> None:
    local = TransformersBackend.from_pretrained(folders["draft"], name="draft")
    assert (remote.name, remote.judge, remote.identity) == (local.name, local.judge, local.identity)
    assert remote.cpu_threads >= 1
    puzzle = make_puzzle(4)
    results = []
    backends: tuple[Any, ...] = (local, remote)  # the same protocol, two session types
    for b in backends:
        s = b.open_session(puzzle.image, puzzle.question.text())
        out = b.generate_step(s, max_tokens=12, stop="\n", budget=5)
        more = b.generate_step(s, max_tokens=12, stop="\n")
        fork = b.fork(s)
        score = b.score(fork, "Row 2: empty.", stop="\n", judge=b.judge)
        b.rollback(fork, score.n_tokens)
        n = b.append(s, "Row 9: red circle.", stop="\n")
        results.append((out, more, score, n, s.length, fork.length, s.finished))
        b.close(fork)
        b.close(s)
    assert results[0] == results[1]
    assert isinstance(s, RemoteSession)


def test_errors_cross_the_pipe(remote: ProcessBackend, tmp_path: Path) -> None:
    puzzle = make_puzzle(4)
    s = remote.open_session(puzzle.image, puzzle.question.text())
    remote.close(s)
    with pytest.raises(BackendError, match="no session"):
        remote.rollback(s, 1)
    with pytest.raises(ModelLoadError, match="no model folder"):  # raised in the child, typed here
        ProcessBackend.from_pretrained(tmp_path / "missing")


@pytest.mark.asyncio
async def test_fpsr_with_the_draft_in_a_process_equals_fpsr_with_it_in_a_thread(
    remote: ProcessBackend, tiny_pair
) -> None:  # type: ignore[no-untyped-def]
    target, draft = tiny_pair
    config = ReasonerConfig(
        cache=CacheConfig(enabled=False),
        verification=VerificationConfig(mode="likelihood", tau=0.01),
        generation=GenerationConfig(max_steps=3, max_step_tokens=8),
    )
    puzzle = make_puzzle(6)
    runs = []
    for d in (draft, remote):
        r = await Reasoner(target, d, config=config).ainvoke(puzzle.image, puzzle.question.text())
        runs.append([(s.text, s.source) for s in r.steps])
    assert runs[0] == runs[1] and runs[0]


def _kill(backend: ProcessBackend) -> None:
    os.kill(backend.pid, signal.SIGKILL)
    backend._child.proc.wait()


def test_a_dead_child_is_a_clear_error_and_the_next_session_opens_in_a_restarted_one(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    backend = ProcessBackend.from_pretrained(folders["draft"], name="draft")
    puzzle = make_puzzle(4)
    s = backend.open_session(puzzle.image, puzzle.question.text())
    before = backend.generate_step(s, max_tokens=4, stop="\n")
    first_pid = backend.pid
    _kill(backend)
    with caplog.at_level("WARNING"), pytest.raises(BackendError, match="not running"):
        backend.generate_step(s, max_tokens=4, stop="\n")
    assert any("restarting it" in r.message for r in caplog.records)
    backend.close(s)  # nothing to close: no error
    backend.ready()  # the new child starts in the background; calls fail at once meanwhile
    fresh = backend.open_session(puzzle.image, puzzle.question.text())
    assert backend.pid != first_pid and backend.restarts == 1 and backend.alive
    assert backend.generate_step(fresh, max_tokens=4, stop="\n") == before
    with pytest.raises(BackendError, match="lost"):  # an old handle never reaches a new session
        backend.rollback(s, 1)
    backend.shutdown()
    with pytest.raises(BackendError, match="shut down"):  # shut down for good: no restart
        backend.open_session(puzzle.image, puzzle.question.text())


def test_a_replacement_that_cannot_load_backs_off(tmp_path: Path, folders: dict[str, Path]) -> None:
    folder = tmp_path / "draft"
    shutil.copytree(folders["draft"], folder)
    backend = ProcessBackend.from_pretrained(folder, name="draft")
    puzzle = make_puzzle(4)
    backend.close(backend.open_session(puzzle.image, puzzle.question.text()))
    shutil.rmtree(folder)  # the model cannot load any more
    _kill(backend)
    with pytest.raises(BackendError, match="not running"):  # a BackendError: a draft's request goes on
        backend.open_session(puzzle.image, puzzle.question.text())
    with pytest.raises(BackendError, match="failed to start"):
        backend.ready()
    pid = backend.pid
    start = time.monotonic()
    with pytest.raises(BackendError, match="next restart in"):  # at once, no new child meanwhile
        backend.open_session(puzzle.image, puzzle.question.text())
    assert time.monotonic() - start < 0.5
    assert backend.pid == pid and backend.restarts == 1
    backend.shutdown()


def test_it_declares_the_capabilities_of_the_backend_in_the_child(folders: dict[str, Path]) -> None:
    local = TransformersBackend.from_pretrained(folders["draft"], name="draft")
    backend = registry.open(folders["draft"], name="draft", device="cpu", process=True, wait=False)
    assert isinstance(backend, ProcessBackend)
    try:
        caps = registry.capabilities_of(backend)  # waits for the child, which tells them
        assert backend.alive and caps.cpu_threads >= 1
        # blocking calls that take a thread count, which a cancelled caller may abandon,
        # released by shutdown; the rest is the child's
        expected = registry.capabilities_of(local).but(sets_threads=True, release="sync", abandonable=True)
        assert caps.but(cpu_threads=0) == expected.but(cpu_threads=0)
    finally:
        registry.shutdown(backend)
    assert not backend.alive


# ---------------------------------------------------------------------- the in-process stand-in
def _steps(backend: Any, session: Any, n: int) -> list[str]:
    return [backend.generate_step(session, max_tokens=10, stop="\n").text for _ in range(n)]


def test_a_stand_in_serves_until_the_child_is_ready_then_new_sessions_open_in_the_child(
    folders: dict[str, Path],
) -> None:
    backend = ProcessBackend.from_pretrained(folders["draft"], name="draft", wait=False)
    stand_in = TransformersBackend.from_pretrained(folders["draft"], name="draft")
    dropped = weakref.finalize(stand_in, lambda: None)  # alive while anything holds the stand-in
    backend.use_stand_in(stand_in)
    del stand_in
    assert backend.serving_here  # the child is still importing torch
    assert backend.name == "draft" and backend.cpu_threads >= 1
    puzzle = make_puzzle(4)
    early = backend.open_session(puzzle.image, puzzle.question.text())
    assert not isinstance(early, RemoteSession)  # served here, not waited for
    first = _steps(backend, early, 1)
    backend.ready()
    late = backend.open_session(puzzle.image, puzzle.question.text())
    assert isinstance(late, RemoteSession) and not backend.serving_here
    # the same greedy steps wherever the model runs; the early session stays where it opened
    assert _steps(backend, late, 3) == first + _steps(backend, early, 2)
    fork = backend.fork(early)
    assert not isinstance(fork, RemoteSession)
    backend.close(fork)
    backend.close(early)
    gc.collect()
    assert not dropped.alive  # its last session closed: the stand-in's model is freed
    backend.close(late)
    backend.shutdown()


def test_a_child_that_fails_to_start_leaves_the_stand_in_serving(
    folders: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = ProcessBackend.from_pretrained(tmp_path / "missing", name="draft", wait=False)
    backend.use_stand_in(TransformersBackend.from_pretrained(folders["draft"], name="draft"))
    backend._child.proc.wait(60)  # the child reported its error and exited
    puzzle = make_puzzle(4)
    with caplog.at_level("WARNING"):
        s = backend.open_session(puzzle.image, puzzle.question.text())
    assert not isinstance(s, RemoteSession) and backend.serving_here and not backend.alive
    assert sum("failed to start" in r.message for r in caplog.records) == 1
    assert _steps(backend, s, 1)
    backend.close(s)
    backend.shutdown()
    with pytest.raises(BackendError, match="shut down"):
        backend.open_session(puzzle.image, puzzle.question.text())


@pytest.mark.asyncio
async def test_fpsr_gives_the_same_steps_on_the_stand_in_and_after_the_switch(
    folders: dict[str, Path], tiny_pair
) -> None:  # type: ignore[no-untyped-def]
    target, draft = tiny_pair
    config = ReasonerConfig(
        cache=CacheConfig(enabled=False),
        verification=VerificationConfig(mode="likelihood", tau=0.0),  # every draft step accepted
        generation=GenerationConfig(max_steps=3, max_step_tokens=8),
    )
    puzzle = make_puzzle(6)
    backend = ProcessBackend.from_pretrained(folders["draft"], name="draft", wait=False)
    stand_in = TransformersBackend.from_pretrained(folders["draft"], name="draft")
    opened_here: list[object] = []
    open_here = stand_in.open_session

    def counted(*args: Any, **kwargs: Any) -> Any:
        opened_here.append(args)
        return open_here(*args, **kwargs)

    stand_in.open_session = counted  # type: ignore[method-assign]
    backend.use_stand_in(stand_in)
    runs = []
    try:
        r = Reasoner(target, backend, config=config)
        runs.append(await r.ainvoke(puzzle.image, puzzle.question.text()))  # before the child is ready
        assert opened_here, "the first request should have opened its draft session in the stand-in"
        backend.ready()
        runs.append(await r.ainvoke(puzzle.image, puzzle.question.text()))  # in the child
        assert len(opened_here) == 1
        runs.append(await Reasoner(target, draft, config=config).ainvoke(puzzle.image, puzzle.question.text()))
    finally:
        backend.shutdown()
    steps = [[(s.text, s.source) for s in run.steps] for run in runs]
    assert steps[0] == steps[1] == steps[2] and steps[0]
    assert runs[0].steps[0].source.value == "draft"  # drafted by the stand-in and accepted


# ---------------------------------------------------------------------- stopping
def test_the_child_exits_at_once_on_shutdown(folders: dict[str, Path]) -> None:
    backend = ProcessBackend.from_pretrained(folders["draft"], name="draft")
    proc = backend._child.proc
    start = time.monotonic()
    backend.shutdown()
    # the interpreter's teardown alone took 1.2 s with torch and transformers loaded
    assert time.monotonic() - start < 1.0 and proc.returncode == 0


def test_a_child_still_starting_is_stopped_at_once(folders: dict[str, Path]) -> None:
    """It would read the shutdown only once built (seconds of imports): the exit waited for it."""
    backend = ProcessBackend.from_pretrained(folders["draft"], name="draft", wait=False)
    proc = backend._child.proc
    start = time.monotonic()
    backend.shutdown()
    assert time.monotonic() - start < 1.0 and proc.returncode is not None


def test_close_releases_the_backends_a_reasoner_owns_and_only_those(
    folders: dict[str, Path], remote: ProcessBackend, tiny_pair
) -> None:  # type: ignore[no-untyped-def]
    target, _ = tiny_pair
    config = ReasonerConfig(generation=GenerationConfig(max_steps=2, max_step_tokens=8))
    puzzle = make_puzzle(3)
    owned = ProcessBackend.from_pretrained(folders["draft"], name="draft")
    owner = Reasoner(target, owned, config=config, owns_backends=True)
    borrower = Reasoner(target, remote, config=config)
    for r in (owner, borrower):
        assert r.invoke(puzzle.image, puzzle.question.text()).steps
        r.close()
    assert not owned.alive and remote.alive
    with pytest.raises(ConfigError, match="closed"):
        owner.invoke(puzzle.image, puzzle.question.text())
    assert borrower.invoke(puzzle.image, puzzle.question.text()).steps  # a borrower's close stops its loop only
    borrower.close()
