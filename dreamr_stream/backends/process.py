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
fire-and-forget, since the engine calls it from the event loop. A child that dies makes every
later call raise ``BackendError``; the child exits on ``shutdown`` or when its parent goes (the
pipe closes).

The child is a fresh interpreter (``python -m dreamr_stream.backends.process``) over a socket
pair, not a ``multiprocessing`` spawn: spawn re-imports the parent's main script in the child,
which breaks any script without an ``if __name__ == "__main__"`` guard (the quick start has
none, and needs none).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from PIL import Image

from dreamr_stream.backends.base import ModelBackend, ScoreOutput, StepOutput
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError

__all__ = ["ProcessBackend", "RemoteSession"]

log = logging.getLogger(__name__)

# methods whose first argument is a session (sent as its id)
_SESSION_OPS = frozenset({"generate_step", "score", "append", "begin_step", "rollback", "fork", "close"})


@dataclass
class RemoteSession:
    """A handle on a session that lives in the backend's process."""

    id: int
    length: int = 0
    finished: bool = False


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a BackendError carrying its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return BackendError(f"{type(e).__name__}: {e}")


def _serve(conn: Connection, factory: Callable[[], ModelBackend[Any]]) -> None:
    """The child's loop: build the backend, then answer requests until shutdown or EOF."""
    try:
        backend = factory()
    except BaseException as e:
        conn.send(("error", _portable(e), traceback.format_exc()))
        return
    conn.send(
        (
            "ok",
            {
                "name": backend.name,
                "judge": backend.judge,
                "identity": getattr(backend, "identity", backend.name),
                "recommended_verification": getattr(backend, "recommended_verification", {}),
                "cpu_threads": getattr(backend, "cpu_threads", 0),
            },
            None,
        )
    )
    sessions: dict[int, Any] = {}
    ids = itertools.count(1)

    def state(sid: int) -> tuple[int, int, bool]:
        s = sessions[sid]
        return sid, s.length, s.finished

    while True:
        try:
            op, threads, args, kwargs = conn.recv()
        except (EOFError, OSError):
            break
        if op == "shutdown":
            break
        try:
            if threads and hasattr(backend, "use_threads"):
                backend.use_threads(threads)
            if op == "open_session":
                sid = next(ids)
                sessions[sid] = backend.open_session(*args, **kwargs)
                reply: Any = (None, [state(sid)])
            elif op in _SESSION_OPS:
                sid, *rest = args
                if sid not in sessions:
                    raise BackendError(f"{op}: no session {sid} in the backend process (closed?)")
                session = sessions[sid]
                if op == "close":
                    del sessions[sid]
                    backend.close(session)
                    continue  # fire-and-forget: no reply
                value = getattr(backend, op)(session, *rest, **kwargs)
                touched = [state(sid)]
                if op == "fork":
                    new = next(ids)
                    sessions[new] = value
                    value = None
                    touched.append(state(new))
                reply = (value, touched)
            else:
                raise BackendError(f"unknown backend operation {op!r}")
            conn.send(("ok", reply, None))
        except BaseException as e:
            if op == "close":
                log.warning("closing a session in the backend process failed: %s", e)
                continue
            conn.send(("error", _portable(e), traceback.format_exc()))


def _stop(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    try:
        conn.send(("shutdown", 0, (), {}))
    except (OSError, ValueError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    conn.close()


class ProcessBackend:
    """A ``ModelBackend`` served from a child process.

    >>> draft = ProcessBackend.from_pretrained("dreamr_stream/zoo/weights/draft-sapo", name="draft")
    >>> reasoner = Reasoner(target, draft)
    """

    def __init__(
        self, factory: Callable[[], ModelBackend[Any]], *, wait: bool = True, start_timeout_s: float = 300.0
    ) -> None:
        """``factory``: a picklable callable that builds the backend in the child. ``wait``:
        block until it is built; else call ``ready()`` before use (load something meanwhile)."""
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dreamr_stream.backends.process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(factory)
        self._lock = threading.Lock()  # one request/reply at a time
        self._send_lock = threading.Lock()  # fire-and-forget closes may interleave with a request
        self._threads = 0  # intra-op threads for the next call (0: leave as is)
        self._sessions: weakref.WeakValueDictionary[int, RemoteSession] = weakref.WeakValueDictionary()
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._conn)
        self._start_timeout_s = start_timeout_s
        self._ready = False
        if wait:
            self.ready()

    def ready(self) -> ProcessBackend:
        """Wait until the child has built the backend (raises its error if it failed)."""
        if self._ready:
            return self
        if not self._conn.poll(self._start_timeout_s):
            self.shutdown()
            raise BackendError(f"the backend process did not start within {self._start_timeout_s:.0f} s")
        try:
            info = self._reply("start")
        except BaseException:
            self.shutdown()
            raise
        self.name: str = info["name"]
        self.judge: JudgeTemplate = info["judge"]
        self.identity: str = info["identity"]
        self.recommended_verification: dict[str, Any] = info["recommended_verification"]
        self._cpu_threads: int = info["cpu_threads"]
        self._ready = True
        return self

    @property
    def pid(self) -> int:
        return self._proc.pid

    def pin(self, cpus: set[int]) -> None:
        """Run the child on these cores only (e.g. the ones a local model server leaves free)."""
        os.sched_setaffinity(self._proc.pid, cpus)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "cpu", name: str = "model", wait: bool = True
    ) -> ProcessBackend:
        """A ``TransformersBackend`` loaded from a local folder, in its own process."""
        from dreamr_stream.backends.hf import TransformersBackend

        return cls(partial(TransformersBackend.from_pretrained, Path(path), device=device, name=name), wait=wait)

    # ------------------------------------------------------------------ plumbing
    def _reply(self, op: str) -> Any:
        try:
            status, value, trace = self._conn.recv()
        except (EOFError, OSError) as e:
            raise BackendError(f"the backend process died during {op} (exit code {self._proc.poll()})") from e
        if status == "error":
            log.debug("backend process traceback:\n%s", trace)
            raise value
        return value

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if not self.alive:
            raise BackendError(f"the backend process is not running (exit code {self._proc.poll()})")
        with self._lock:
            with self._send_lock:
                self._conn.send((op, self._threads, args, kwargs))
            value, touched = self._reply(op)
        handles = []
        for sid, length, finished in touched:
            handle = self._sessions.get(sid) or RemoteSession(sid)
            handle.length, handle.finished = length, finished
            self._sessions[sid] = handle
            handles.append(handle)
        return value, handles

    # ------------------------------------------------------------------ CPU threads (engine.threads)
    @property
    def cpu_threads(self) -> int:
        return self._cpu_threads

    def use_threads(self, n: int) -> None:
        """Sent with the next call: the child sets its own intra-op threads."""
        self._threads = n

    # ------------------------------------------------------------------ ModelBackend
    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> RemoteSession:
        _, (handle,) = self._call("open_session", image, question, seed=seed)
        return handle  # type: ignore[no-any-return]

    def generate_step(
        self,
        session: RemoteSession,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
    ) -> StepOutput:
        out, _ = self._call(
            "generate_step", session.id, max_tokens=max_tokens, stop=stop, temperature=temperature, budget=budget
        )
        return out  # type: ignore[no-any-return]

    def score(self, session: RemoteSession, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        out, _ = self._call("score", session.id, text, stop=stop, judge=judge)
        return out  # type: ignore[no-any-return]

    def append(self, session: RemoteSession, text: str, *, stop: str) -> int:
        n, _ = self._call("append", session.id, text, stop=stop)
        return n  # type: ignore[no-any-return]

    def begin_step(self, session: RemoteSession, text: str, *, proposal: str = "") -> int:
        n, _ = self._call("begin_step", session.id, text, proposal=proposal)
        return n  # type: ignore[no-any-return]

    def rollback(self, session: RemoteSession, n_tokens: int) -> None:
        self._call("rollback", session.id, n_tokens)

    def fork(self, session: RemoteSession) -> RemoteSession:
        _, (_, new) = self._call("fork", session.id)
        return new  # type: ignore[no-any-return]

    def close(self, session: RemoteSession) -> None:
        """Fire-and-forget (the engine closes sessions from the event loop)."""
        if not self.alive:
            return
        with self._send_lock:
            try:
                self._conn.send(("close", 0, (session.id,), {}))
            except OSError:  # the child is gone: so is the session
                pass

    # ------------------------------------------------------------------ lifecycle
    @property
    def alive(self) -> bool:
        return self._proc.poll() is None and self._finalizer.alive

    def shutdown(self) -> None:
        """Stop the child process (also done when this object is collected, or at exit)."""
        self._finalizer()


def _child_main(fd: int) -> None:
    conn = Connection(fd)
    try:
        factory = conn.recv()
    except (EOFError, OSError):
        return
    _serve(conn, factory)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
