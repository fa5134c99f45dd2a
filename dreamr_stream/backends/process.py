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

A call whose caller is cancelled is abandoned (``Capabilities.abandonable``): the caller leaves at
once, and the worker thread settles the call. Its reply is still read (and dropped) while the
thread keeps the pipe, so no other call can take it for its own; a child that does not answer
within ``abandon_grace_s`` of the caller leaving, and has not computed meanwhile, is killed and
replaced in the background, as at a deadline; one still computing (starved of CPU by a busy
machine, not stalled) is given more grace, up to the call's deadline (``_Grace``). A cancel
therefore never waits for a stopped or hung child, and a healthy child, which answers within a
step chunk or keeps computing, is kept. A call abandoned before its turn is never sent.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from PIL import Image

from dreamr_stream.backends._process_child import BATCH_OP, SESSION_OPS
from dreamr_stream.backends._process_supervision import Child, Supervisor, outcome, read_start
from dreamr_stream.backends.base import (
    Batches,
    Capabilities,
    ModelBackend,
    Repairs,
    ScoreOutput,
    SetsThreads,
    StepCall,
    StepOutput,
)
from dreamr_stream.backends.call_context import CallWatch, current_watch
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError

__all__ = ["ProcessBackend", "RemoteSession", "TransformersLoader"]

log = logging.getLogger(__name__)

# how often a call that may be abandoned looks whether its caller has gone while it waits
WATCH_SLICE_S = 0.05
# the ops whose reply names a session they created (the last one touched)
CREATING_OPS = frozenset({"open_session", "fork"})


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


# the CPU a child must have used over one grace to be taken for starved, not stalled: a stopped
# or hung child uses none, one computing on shared cores some (its share of a busy machine)
STARVED_CPU_S = 0.01


class _Grace:
    """How long the reply of a call whose caller left is still awaited: ``abandon_grace_s``
    after the caller left, renewed for as long as the child keeps computing (``Child.cpu_seconds``)
    up to the call's deadline. Why: a draft starved by a busy server on the same cores may take
    seconds for a step it takes milliseconds for alone; killing it then costs a restart (seconds
    of imports, on the same busy cores) and the requests that would have used it, while a stopped
    or hung child, which computes nothing, is still killed after one grace."""

    def __init__(self, child: Child, end: float) -> None:
        self._child, self._end = child, end
        self._cpu = child.cpu_seconds()

    def end(self, grace_s: float) -> float:
        """When the wait ends: renewed by ``grace_s`` each time it is reached with the child having
        computed meanwhile (where its CPU time cannot be read, never renewed)."""
        if time.monotonic() >= self._end and self._cpu is not None:
            cpu = self._child.cpu_seconds()
            if cpu is not None and cpu - self._cpu >= STARVED_CPU_S:
                self._end, self._cpu = time.monotonic() + grace_s, cpu
        return self._end


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
        abandon_grace_s: float = 1.0,
        backoff_s: tuple[float, float] = (5.0, 300.0),
    ) -> None:
        """``factory``: a picklable callable that builds the backend in the child. ``wait``:
        block until it is built; else call ``ready()`` before use (load something meanwhile).
        ``call_timeout_s``: the deadline of each call (a small model's call takes well under a
        second); ``abandon_grace_s``: how long the reply of a call whose caller has gone is still
        awaited before the child is taken for stalled and replaced; ``backoff_s``: the first and
        the longest wait before restarting a child that crashed before it answered anything (on
        start, or on every request)."""
        self._lock = threading.Lock()  # one request/reply at a time
        self._send_lock = threading.Lock()  # fire-and-forget closes may interleave with a request
        self._closes: deque[int] = deque()  # sessions to close, when ``close`` could not send at once
        self._threads = 0  # intra-op threads for the next call (0: leave as is)
        self._sessions: weakref.WeakValueDictionary[int, RemoteSession] = weakref.WeakValueDictionary()
        self._start_timeout_s = start_timeout_s
        self._call_timeout_s = call_timeout_s
        self._abandon_grace_s = abandon_grace_s
        self._shut_down = False
        # what the child's backend declares (or the stand-in's, until the child has told)
        self._declared: Capabilities | None = None
        # the in-process stand-in (``use_stand_in``), its open sessions by id(), and whether it
        # serves for good because the child failed to start
        self._stand_in: ModelBackend[Any] | None = None
        self._stand_in_sets_threads = False
        self._stand_in_sessions: dict[int, Any] = {}
        self._stand_in_lock = threading.Lock()
        # one stand-in call at a time, also while an abandoned one still runs in its thread
        self._stand_in_calls = threading.Lock()
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

    @contextlib.contextmanager
    def _here(self) -> Iterator[ModelBackend[Any]]:
        """The stand-in, for one call: one at a time, since the engine does not wait for a call
        it abandoned and a model in this process computes one call at a time."""
        with self._stand_in_calls:
            stand_in = self._stand_in
            if stand_in is None:
                raise BackendError(f"{self.name}: the backend was shut down")
            yield stand_in

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
        watch = current_watch()
        self._take_turn(op, watch)
        try:
            child = self._child_for(op, args)
            value, touched = self._exchange(child, op, (op, self._threads, args, kwargs), watch)
        finally:
            self._lock.release()
        if watch is not None and watch.abandoned_at is not None and op in CREATING_OPS:
            self._closes.append(touched[-1][0])  # nobody holds the session it made: closed with the next call
        handles = []
        for sid, length, finished in touched:
            handle = self._sessions.get(sid) or RemoteSession(sid)
            handle.length, handle.finished = length, finished
            self._sessions[sid] = handle
            handles.append(handle)
        return value, handles

    def _take_turn(self, op: str, watch: CallWatch | None) -> None:
        """Take the pipe (``_lock``) within the call's deadline. A call whose caller leaves while
        it waits is dropped unsent: its result would go to nobody."""
        limit = self._call_timeout_s
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if self._lock.acquire(timeout=max(0.0, min(left, WATCH_SLICE_S) if watch is not None else left)):
                break
            if watch is not None and watch.abandoned_at is not None:
                raise BackendError(f"{self.name}: {op} was abandoned by its caller before its turn")
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"{self.name}: {op} waited {limit:g} s for the backend process to finish another call"
                )
        if watch is not None and watch.abandoned_at is not None:
            self._lock.release()
            raise BackendError(f"{self.name}: {op} was abandoned by its caller before its turn")

    def _exchange(self, child: Child, op: str, message: Any, watch: CallWatch | None) -> Any:
        """Send ``message`` and read the child's answer within the call's deadline (or the grace
        after its caller left); a child that does not answer in time is killed and replaced in
        the background (the caller, if still there, gets ``BackendError`` at once)."""
        limit = self._call_timeout_s
        deadline = time.monotonic() + limit
        try:
            with self._send_lock:
                self._send_closes(child, deadline - time.monotonic())
                child.send(message, deadline - time.monotonic())
            if not self._reply_ready(child, deadline, watch):
                raise TimeoutError
            reply = child.reply()
            child.answered = True
        except (BlockingIOError, TimeoutError) as e:  # it does not read, or does not answer
            why = self._no_answer(op, watch)
            self._life.lost(child, why)
            raise BackendError(f"{self.name}: the backend process {why} (killed)") from e
        except (EOFError, OSError) as e:  # the pipe broke: the child is gone
            self._life.lost(child, f"died during {op}")
            raise BackendError(
                f"{self.name}: the backend process died during {op} (exit code {child.proc.returncode})"
            ) from e
        return outcome(reply)

    def _reply_ready(self, child: Child, deadline: float, watch: CallWatch | None) -> bool:
        """Whether the child's reply is there before ``deadline``, or, once the caller has left
        (``watch``), before the grace after that: a healthy child answers within a step chunk,
        so one that does not is stalled, and only a kill frees the pipe for other calls."""
        if watch is None:  # nobody can abandon this call: one wait
            return child.conn.poll(max(0.0, deadline - time.monotonic()))
        grace: _Grace | None = None
        while True:
            if watch.abandoned_at is not None and grace is None:
                grace = _Grace(child, watch.abandoned_at + self._abandon_grace_s)
            end = deadline if grace is None else min(deadline, grace.end(self._abandon_grace_s))
            left = end - time.monotonic()
            if child.conn.poll(max(0.0, min(left, WATCH_SLICE_S))):
                return True
            if left <= 0:
                return False

    def _no_answer(self, op: str, watch: CallWatch | None) -> str:
        """Why a child that did not answer is taken for lost (its deadline, or its grace)."""
        if watch is not None and watch.abandoned_at is not None:
            return f"did not answer {op} within {self._abandon_grace_s:g} s of its caller leaving"
        return f"did not answer {op} within {self._call_timeout_s:g} s"

    def _child_for(self, op: str, args: tuple[Any, ...]) -> Child:
        """The child to send ``op`` to, built and running (``BackendError`` at once while none
        serves; a session of a lost child cannot be served)."""
        child = self._life.serving(op)
        sids = [c.session for c in args[0]] if op == BATCH_OP else [args[0]] if op in SESSION_OPS else []
        for sid in sids:
            if not child.holds(sid):
                raise BackendError(
                    f"{self.name}: {op}: session {sid} was lost with its backend process, which is not running "
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
        child with each call), released by ``shutdown``, which a cancelled caller may abandon
        (the module's docstring says how they are settled); its backend's ``batches``, whose
        ``generate_batch`` rows travel to the child in one message."""
        declared = self._declared
        if declared is None:
            self.ready()
            declared = self._declared
            assert declared is not None  # set by a successful start
        return declared.but(concurrent=False, sets_threads=True, release="sync", abandonable=True)

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
            with self._here() as here:
                return self._track(here.open_session(image, question, seed=seed))
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
            with self._here() as here:
                return here.generate_step(session, **kwargs)  # type: ignore[arg-type]
        out, _ = self._call("generate_step", session.id, **kwargs)
        return out  # type: ignore[no-any-return]

    def generate_batch(self, calls: list[StepCall]) -> list[StepOutput]:
        """The rows in one message to the child, which decodes them together (its backend's
        ``generate_batch``); rows of sessions still in the stand-in go to the stand-in."""
        outs: dict[int, StepOutput] = {}
        remote = [i for i, c in enumerate(calls) if isinstance(c.session, RemoteSession)]
        here = [i for i, c in enumerate(calls) if not isinstance(c.session, RemoteSession)]
        if here:
            with self._here() as stand_in:
                if len(here) > 1 and stand_in.capabilities.batches:
                    outs.update(
                        zip(here, cast(Batches, stand_in).generate_batch([calls[i] for i in here]), strict=True)
                    )
                for i in here:
                    if i not in outs:
                        c = calls[i]
                        outs[i] = stand_in.generate_step(
                            c.session, max_tokens=c.max_tokens, stop=c.stop, temperature=c.temperature, budget=c.budget
                        )
        if remote:
            rows = [replace(calls[i], session=calls[i].session.id) for i in remote]
            values, _ = self._call(BATCH_OP, rows)
            outs.update(zip(remote, values, strict=True))
        return [outs[i] for i in range(len(calls))]

    def score(self, session: Any, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        if not isinstance(session, RemoteSession):
            with self._here() as here:
                return here.score(session, text, stop=stop, judge=judge)
        out, _ = self._call("score", session.id, text, stop=stop, judge=judge)
        return out  # type: ignore[no-any-return]

    def append(self, session: Any, text: str, *, stop: str) -> int:
        if not isinstance(session, RemoteSession):
            with self._here() as here:
                return here.append(session, text, stop=stop)
        n, _ = self._call("append", session.id, text, stop=stop)
        return n  # type: ignore[no-any-return]

    def begin_step(self, session: Any, text: str, *, proposal: str = "") -> int:
        if not isinstance(session, RemoteSession):
            with self._here() as here:
                return cast(int, cast(Repairs, here).begin_step(session, text, proposal=proposal))
        n, _ = self._call("begin_step", session.id, text, proposal=proposal)
        return n  # type: ignore[no-any-return]

    def rollback(self, session: Any, n_tokens: int) -> None:
        if not isinstance(session, RemoteSession):
            with self._here() as here:
                here.rollback(session, n_tokens)
            return
        self._call("rollback", session.id, n_tokens)

    def fork(self, session: Any) -> Any:
        if not isinstance(session, RemoteSession):
            with self._here() as here:
                return self._track(here.fork(session))
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
