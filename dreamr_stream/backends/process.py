"""A backend that runs in its own process, so its model calls never wait for this one's GIL.

Why: FPSR overlaps a draft call with a target call. In one process the two calls run in two
threads, and half of a small model's forward is Python (module calls, cache bookkeeping) that
holds the GIL. On the 2-core development machine the demo target and draft decoding at once
in two threads ran 2.6x and 3.0x slower than alone: the overlap cost more than it saved. In two
processes (one intra-op thread each) they ran 0.89x and 1.15x (``benchmarks/results/overlap.md``).
Serving engines split the same way (a model worker per process), for the same reason.

Design: the child builds the backend from a picklable factory and serves its methods over a
pipe, one request at a time; sessions stay in the child and the parent holds ``RemoteSession``
handles whose ``length`` and ``finished`` every reply refreshes, so reading them costs no round
trip. The backend protocol already keeps token ids inside each model (text crosses between
draft and target), so only text, images and small results cross the pipe. ``close`` is
fire-and-forget, since the engine calls it from the event loop. The child exits on ``shutdown``
or when its parent goes (the pipe closes).

Every call has a deadline (``call_timeout_s``; waiting for another call's turn counts): a child
that does not answer in time (stopped, hung) is killed. A child that dies or is killed fails the
calls on its sessions with ``BackendError``, which for a draft means its request goes on with the
target alone (``engine.fpsr``), and is replaced in the background (one warning in the log); until
the replacement serves, calls fail at once, so requests go alone instead of waiting for it. Session
ids carry the child's generation, so a handle from a dead child can never reach a session of its
successor. Crash loops back off (``_process_supervision``), and ``close`` never blocks.

The child is a fresh interpreter (``python -m dreamr_stream.backends._process_child``) over a socket
pair, not a ``multiprocessing`` spawn: spawn re-imports the parent's main script in the child,
which breaks any script without an ``if __name__ == "__main__"`` guard (the quick start has
none, and needs none).

Starting a child costs seconds (it imports torch and transformers itself: about 4 s on the
2-core development machine). Two things keep that off a first request's path: this module and
``TransformersLoader`` import neither library, so a caller can start the child before its own
imports and the two import side by side on two cores; and a *stand-in* (``use_stand_in``: the
same model loaded in this process) serves the sessions opened before the child is ready. Each
session stays where it was opened; once the child is ready new sessions open there and the
stand-in is dropped after its last session closes. Greedy steps do not depend on where the
model runs (``tests/test_process_backend.py`` compares them), so a request's steps are the same
either way: only its speed differs (in this process the two models share one GIL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from PIL import Image

from dreamr_stream.backends._process_child import SESSION_OPS
from dreamr_stream.backends._process_supervision import Child, Supervisor, outcome, read_start
from dreamr_stream.backends.base import Capabilities, ModelBackend, Repairs, ScoreOutput, SetsThreads, StepOutput
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError

__all__ = ["ProcessBackend", "RemoteSession", "TransformersLoader"]

log = logging.getLogger(__name__)


@dataclass
class RemoteSession:
    """A handle on a session that lives in the backend's process."""

    id: int
    length: int = 0
    finished: bool = False


@dataclass(frozen=True)
class TransformersLoader:
    """A picklable factory of a ``TransformersBackend`` from a local folder. Building one
    imports neither torch nor transformers (the child does), so a child can start first."""

    path: Path
    device: str = "cpu"
    name: str = "model"

    def __call__(self) -> ModelBackend[Any]:
        from dreamr_stream.backends.hf import TransformersBackend

        return TransformersBackend.from_pretrained(self.path, device=self.device, name=self.name)


class ProcessBackend:
    """A ``ModelBackend`` served from a child process, restarted when it dies.

    >>> draft = ProcessBackend.from_pretrained("dreamr_stream/zoo/weights/draft-sapo", name="draft")
    >>> reasoner = Reasoner(target, draft)
    """

    def __init__(
        self,
        factory: Callable[[], ModelBackend[Any]],
        *,
        wait: bool = True,
        start_timeout_s: float = 300.0,
        call_timeout_s: float = 30.0,
        backoff_s: tuple[float, float] = (5.0, 300.0),
    ) -> None:
        """``factory``: a picklable callable that builds the backend in the child. ``wait``:
        block until it is built; else call ``ready()`` before use (load something meanwhile).
        ``call_timeout_s``: the deadline of each call (a small model's call takes well under a
        second); ``backoff_s``: the first and the longest wait before restarting a child that
        crashed before it answered anything (on start, or on every request)."""
        self._lock = threading.Lock()  # one request/reply at a time
        self._send_lock = threading.Lock()  # fire-and-forget closes may interleave with a request
        self._closes: deque[int] = deque()  # sessions to close, when ``close`` could not send at once
        self._threads = 0  # intra-op threads for the next call (0: leave as is)
        self._sessions: weakref.WeakValueDictionary[int, RemoteSession] = weakref.WeakValueDictionary()
        self._start_timeout_s = start_timeout_s
        self._call_timeout_s = call_timeout_s
        self._shut_down = False
        # what the child's backend declares (or the stand-in's, until the child has told)
        self._declared: Capabilities | None = None
        # the in-process stand-in (``use_stand_in``), its open sessions by id(), and whether it
        # serves for good because the child failed to start
        self._stand_in: ModelBackend[Any] | None = None
        self._stand_in_sets_threads = False
        self._stand_in_sessions: dict[int, Any] = {}
        self._stand_in_lock = threading.Lock()
        self._stand_in_only = False
        self._life = Supervisor(self, factory, start_timeout_s=start_timeout_s, backoff_s=backoff_s)
        self.name = "model"  # until the child tells its backend's
        if wait:
            self.ready()

    @property
    def name(self) -> str:
        return self._life.name

    @name.setter
    def name(self, name: str) -> None:
        self._life.name = name

    @property
    def _child(self) -> Child:
        return self._life.child

    @property
    def restarts(self) -> int:
        """How many replacement children were started."""
        return self._life.restarts

    def ready(self) -> ProcessBackend:
        """Wait until the child has built the backend. Its error if it failed: on the first
        start as it is (the backend is shut down), for a replacement as a ``BackendError``."""
        child = self._child
        if self._life.down:  # a replacement is due: wait for a start under way
            self._life.await_restart()
            return self
        if child.ready:
            return self
        try:
            info = read_start(child, self._start_timeout_s)
        except BaseException:  # failed, or interrupted while waiting: leave no child behind
            self.shutdown()
            raise
        self._started(child, info)
        return self

    def _started(self, child: Child, info: dict[str, Any]) -> None:
        """The child has built its backend: take what it tells about it."""
        self.name = info["name"]
        self.judge: JudgeTemplate = info["judge"]
        self._declared = info["capabilities"]
        child.built.set()

    @property
    def pid(self) -> int:
        return self._child.proc.pid

    def pin(self, cpus: set[int]) -> None:
        """Run the child on these cores only (e.g. the ones a local model server leaves free);
        a restarted child is pinned the same way."""
        self._life.cpus = set(cpus)
        os.sched_setaffinity(self._child.proc.pid, cpus)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        name: str = "model",
        wait: bool = True,
        call_timeout_s: float = 30.0,
    ) -> ProcessBackend:
        """A ``TransformersBackend`` loaded from a local folder, in its own process."""
        return cls(TransformersLoader(Path(path), device=device, name=name), wait=wait, call_timeout_s=call_timeout_s)

    # ------------------------------------------------------------------ the stand-in
    def use_stand_in(self, backend: ModelBackend[Any]) -> None:
        """Serve sessions opened before the child is ready from ``backend``, the same model
        loaded in this process, instead of waiting for the child. Call it before the first
        session opens. A child that fails to start leaves the stand-in serving (one warning)."""
        if self._child.ready:
            return  # nothing to wait for
        self._stand_in = backend
        self.name, self.judge = backend.name, backend.judge
        self._declared = backend.capabilities
        self._stand_in_sets_threads = self._declared.sets_threads

    @property
    def serving_here(self) -> bool:
        """New sessions would open in the stand-in (the child is not ready yet)."""
        return self._stand_in is not None and (self._stand_in_only or not self._child.ready)

    def _opens_here(self) -> bool:
        """Whether a new session opens in the stand-in; takes the child's start once it has
        answered (a poll: never waits for it)."""
        with self._lock:
            child = self._child
            if not self.serving_here:
                return False
            if self._stand_in_only or (child.alive and not child.conn.poll(0)):
                return True  # still starting
            try:
                info = read_start(child, 0)  # answered (or gone): no wait
            except Exception as e:
                child.stop()
                self._stand_in_only = True
                log.warning("%s: the backend process failed to start (%s); serving it in this process", self.name, e)
                return True
            self._started(child, info)
            log.info("%s: the backend process is ready; new sessions open there", self.name)
            self._drop_idle_stand_in()
            return False

    def _here(self) -> ModelBackend[Any]:
        stand_in = self._stand_in
        if stand_in is None:
            raise BackendError(f"{self.name}: the backend was shut down")
        return stand_in

    def _track(self, session: Any) -> Any:
        with self._stand_in_lock:
            self._stand_in_sessions[id(session)] = session
        return session

    def _drop_idle_stand_in(self) -> None:
        """Free the stand-in's model once the child serves and no session of it is open."""
        with self._stand_in_lock:
            if self._stand_in is not None and not self._stand_in_only and self._child.ready:
                if not self._stand_in_sessions:
                    self._stand_in = None

    # ------------------------------------------------------------------ plumbing
    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        limit = self._call_timeout_s
        if not self._lock.acquire(timeout=limit):
            raise BackendError(f"{self.name}: {op} waited {limit:g} s for the backend process to finish another call")
        try:
            child = self._child_for(op, args)
            value, touched = self._exchange(child, op, (op, self._threads, args, kwargs))
        finally:
            self._lock.release()
        handles = []
        for sid, length, finished in touched:
            handle = self._sessions.get(sid) or RemoteSession(sid)
            handle.length, handle.finished = length, finished
            self._sessions[sid] = handle
            handles.append(handle)
        return value, handles

    def _exchange(self, child: Child, op: str, message: Any) -> Any:
        """Send ``message`` and read the child's answer within the call's deadline; a child
        that does not answer in time is killed (the caller gets ``BackendError`` at once)."""
        limit = self._call_timeout_s
        deadline = time.monotonic() + limit
        try:
            with self._send_lock:
                self._send_closes(child, deadline - time.monotonic())
                child.send(message, deadline - time.monotonic())
            if not child.conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            reply = child.reply()
            child.answered = True
        except (BlockingIOError, TimeoutError) as e:  # it does not read, or does not answer
            self._life.lost(child, f"did not answer {op} within {limit:g} s")
            raise BackendError(
                f"{self.name}: the backend process did not answer {op} within {limit:g} s (killed)"
            ) from e
        except (EOFError, OSError) as e:  # the pipe broke: the child is gone
            self._life.lost(child, f"died during {op}")
            raise BackendError(
                f"{self.name}: the backend process died during {op} (exit code {child.proc.returncode})"
            ) from e
        return outcome(reply)

    def _child_for(self, op: str, args: tuple[Any, ...]) -> Child:
        """The child to send ``op`` to, built and running (``BackendError`` at once while none
        serves; a session of a lost child cannot be served)."""
        child = self._life.serving(op)
        if op in SESSION_OPS and not child.holds(args[0]):
            raise BackendError(
                f"{self.name}: {op}: session {args[0]} was lost with its backend process, which is not running "
                f"(a new one serves new sessions)"
            )
        if not child.ready:  # the first child, still starting
            self.ready()
        return child

    def _send_closes(self, child: Child, within_s: float) -> None:
        """Send the closes ``close`` left, with ``_send_lock`` held: those of ``child``'s
        sessions (the rest went with their child). ``within_s`` 0: only while the pipe takes
        them at once."""
        while self._closes and (within_s > 0 or child.writable):
            sid = self._closes.popleft()
            if child.holds(sid):
                child.send(("close", 0, (sid,), {}), max(within_s, 0.01))

    # ------------------------------------------------------------------ what it declares
    @property
    def capabilities(self) -> Capabilities:
        """The child's backend's (the stand-in's until the child has started; without a
        stand-in, waits for the child): blocking calls that take a thread count (sent to the
        child with each call), released by ``shutdown``."""
        declared = self._declared
        if declared is None:
            self.ready()
            declared = self._declared
            assert declared is not None  # set by a successful start
        return declared.but(concurrent=False, sets_threads=True, release="sync")

    @property
    def identity(self) -> str:
        return self.capabilities.identity

    @property
    def recommended_verification(self) -> dict[str, Any]:
        return dict(self.capabilities.recommended_verification)

    @property
    def cpu_threads(self) -> int:
        return self.capabilities.cpu_threads

    def use_threads(self, n: int) -> None:
        """Sent with the next call: the child sets its own intra-op threads (a stand-in sets
        this thread's)."""
        self._threads = n
        stand_in = self._stand_in
        if stand_in is not None and self._stand_in_sets_threads:
            cast(SetsThreads, stand_in).use_threads(n)

    # ------------------------------------------------------------------ ModelBackend
    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> Any:
        if self._opens_here():
            return self._track(self._here().open_session(image, question, seed=seed))
        _, (handle,) = self._call("open_session", image, question, seed=seed)
        return handle

    def generate_step(
        self,
        session: Any,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
    ) -> StepOutput:
        kwargs = {"max_tokens": max_tokens, "stop": stop, "temperature": temperature, "budget": budget}
        if not isinstance(session, RemoteSession):
            return self._here().generate_step(session, **kwargs)  # type: ignore[arg-type]
        out, _ = self._call("generate_step", session.id, **kwargs)
        return out  # type: ignore[no-any-return]

    def score(self, session: Any, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        if not isinstance(session, RemoteSession):
            return self._here().score(session, text, stop=stop, judge=judge)
        out, _ = self._call("score", session.id, text, stop=stop, judge=judge)
        return out  # type: ignore[no-any-return]

    def append(self, session: Any, text: str, *, stop: str) -> int:
        if not isinstance(session, RemoteSession):
            return self._here().append(session, text, stop=stop)
        n, _ = self._call("append", session.id, text, stop=stop)
        return n  # type: ignore[no-any-return]

    def begin_step(self, session: Any, text: str, *, proposal: str = "") -> int:
        if not isinstance(session, RemoteSession):
            return cast(int, cast(Repairs, self._here()).begin_step(session, text, proposal=proposal))
        n, _ = self._call("begin_step", session.id, text, proposal=proposal)
        return n  # type: ignore[no-any-return]

    def rollback(self, session: Any, n_tokens: int) -> None:
        if not isinstance(session, RemoteSession):
            self._here().rollback(session, n_tokens)
            return
        self._call("rollback", session.id, n_tokens)

    def fork(self, session: Any) -> Any:
        if not isinstance(session, RemoteSession):
            return self._track(self._here().fork(session))
        _, (_, new) = self._call("fork", session.id)
        return new

    def close(self, session: Any) -> None:
        """Fire-and-forget, and never blocks (the engine closes sessions from the event loop):
        sent now if the pipe takes it at once, else before the next call."""
        if not isinstance(session, RemoteSession):
            self._close_here(session)
            return
        child = self._child
        if self._shut_down or not child.alive or not child.holds(session.id):
            return  # its child is gone: so is the session
        self._closes.append(session.id)
        if self._send_lock.acquire(blocking=False):
            try:
                with contextlib.suppress(OSError):
                    self._send_closes(child, 0.0)
            finally:
                self._send_lock.release()

    def _close_here(self, session: Any) -> None:
        with self._stand_in_lock:
            self._stand_in_sessions.pop(id(session), None)
        stand_in = self._stand_in
        if stand_in is not None:
            stand_in.close(session)
        self._drop_idle_stand_in()

    # ------------------------------------------------------------------ lifecycle
    @property
    def alive(self) -> bool:
        """The current child runs (a lost one is being replaced)."""
        return not self._shut_down and self._child.alive

    def shutdown(self) -> None:
        """Stop the child process for good (also done when this object is collected, or at
        exit) and drop the stand-in: every later call raises ``BackendError``."""
        self._shut_down = True
        self._life.shutdown()
        with self._stand_in_lock:
            self._stand_in, self._stand_in_sessions = None, {}
