"""The life of a ``ProcessBackend``'s child: start it, talk to it within a deadline, stop it, and
replace it when it is lost.

A child is *lost* when it dies, or when it does not answer a call within the call's deadline (it
is stopped, hung, or swapping): then it is killed (SIGKILL, which also ends a stopped process),
and its replacement starts in a background thread, never on a request's path. Until the
replacement serves, every call fails at once with ``BackendError``; for a draft that means its
request goes on with the target alone at once, instead of waiting seconds for a model to load.

A child that is lost before it ever answered a call (it crashes on start, or on every request)
is replaced only after a back-off that doubles with each such loss, so a crash loop costs a
model load now and then instead of one per request; a child that answered once resets it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from dreamr_stream.backends.base import ModelBackend
from dreamr_stream.errors import BackendError

__all__ = ["Child", "Supervisor", "outcome", "read_start"]

log = logging.getLogger(__name__)

ID_BITS = 32  # a session id is (child generation << ID_BITS) + n
# a serving child exits at once on ``shutdown``; one that does not within this (stopped, or in
# the middle of a long call) is killed: nothing it holds is needed
SHUTDOWN_GRACE_S = 1.0


def _writable(conn: Connection) -> bool:
    """Whether a small message can be sent without blocking (a Unix socket polls writable while
    at most a quarter of its buffer is used: a child that stopped reading fills it)."""
    try:
        return bool(select.select([], [conn.fileno()], [], 0)[1])
    except (OSError, ValueError):
        return False


def _stop(proc: subprocess.Popen[bytes], conn: Connection, sock: socket.socket, built: threading.Event) -> None:
    """Stop a child: one that serves exits at once on ``shutdown`` (``_process_child``); one still
    building its backend would read the request only when done, seconds of imports and loading
    that nobody will use, so it is killed at once, and so is one that does not exit in time."""
    if not built.is_set():
        proc.kill()
    elif proc.poll() is None and _writable(conn):  # a stopped child's buffer may be full
        with contextlib.suppress(OSError, ValueError):
            conn.send(("shutdown", 0, (), {}))
    try:
        proc.wait(timeout=SHUTDOWN_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    conn.close()
    sock.close()


@dataclass
class Child:
    """One child process serving the backend, and the pipe to it."""

    proc: subprocess.Popen[bytes]
    conn: Connection
    sock: socket.socket  # the pipe's socket, to bound how long a send may block
    generation: int
    stop: weakref.finalize[Any, Any]  # stops it; also at exit, or when the backend is collected
    built: threading.Event = field(default_factory=threading.Event)  # set once it has built its backend
    answered: bool = False  # it has answered a call (not just started): losing it later is no crash loop

    @property
    def ready(self) -> bool:
        return self.built.is_set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.stop.alive

    @property
    def writable(self) -> bool:
        """A small message can be sent without blocking."""
        return _writable(self.conn)

    def holds(self, session_id: int) -> bool:
        return session_id >> ID_BITS == self.generation

    def send(self, message: Any, within_s: float) -> None:
        """Send ``message``; OSError (BlockingIOError) if the child does not take it within
        ``within_s``. A blocked write that got part of the message out returns when its wait
        ends and the next write waits again, so each wait is half of it."""
        wait = max(within_s / 2, 0.001)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(wait), int(wait % 1 * 1e6)))
        self.conn.send(message)

    def reply(self) -> tuple[str, Any, str | None]:
        """The child's answer as it came (EOFError or OSError: it is gone): see ``outcome``."""
        reply: tuple[str, Any, str | None] = self.conn.recv()
        return reply

    def cpu_seconds(self) -> float | None:
        """The CPU time it has used so far (user + system), from ``/proc``; None where there is no
        ``/proc`` or it is gone. What tells a starved child, which computes slowly on cores that
        others keep busy, from a stopped or hung one, which does not compute at all."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                # the fields after the command name, which is in parentheses and may hold spaces
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime

    def kill(self) -> None:
        """Kill it at once (stopped or hung: it would not read a ``shutdown``) and reap it."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.stop()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def spawn(owner: object, factory: Callable[[], ModelBackend[Any]], generation: int) -> Child:
    """Start a child that builds ``factory()`` (without waiting for it); it is stopped when
    ``owner`` is collected."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dreamr_stream.backends._process_child", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    conn = Connection(os.dup(ours.fileno()))
    built = threading.Event()
    child = Child(proc, conn, ours, generation, weakref.finalize(owner, _stop, proc, conn, ours, built), built)
    child.send((factory, (generation << ID_BITS) + 1), 10.0)
    return child


def outcome(reply: tuple[str, Any, str | None]) -> Any:
    """The value of a child's reply, or the exception it raised there, raised here."""
    status, value, trace = reply
    if status == "error":
        log.debug("backend process traceback:\n%s", trace)
        raise value
    return value


def read_start(child: Child, timeout_s: float) -> Any:
    """What the child tells once it has built its backend, or the error it failed with."""
    if not child.conn.poll(timeout_s):
        raise BackendError(f"the backend process did not start within {timeout_s:.0f} s")
    try:
        reply = child.reply()
    except (EOFError, OSError) as e:
        with contextlib.suppress(subprocess.TimeoutExpired):  # its pipe closed as it exited: its exit code
            child.proc.wait(SHUTDOWN_GRACE_S)
        raise BackendError(f"the backend process died while starting (exit code {child.proc.returncode})") from e
    return outcome(reply)


@dataclass
class _Down:
    """Why and since when no child serves, and when the next start may begin."""

    since: float  # wall-clock time, for the message
    why: str
    retry_at: float  # time.monotonic()


class Supervisor:
    """Holds a backend's current child and replaces it, in the background, when it is lost."""

    def __init__(
        self,
        owner: object,
        factory: Callable[[], ModelBackend[Any]],
        *,
        start_timeout_s: float,
        backoff_s: tuple[float, float],
    ) -> None:
        self._owner = weakref.ref(owner)  # children stop when it is collected
        self._factory = factory
        self._start_timeout_s = start_timeout_s
        self._backoff_s = backoff_s  # first wait, longest wait
        self.name = "model"
        self.cpus: set[int] | None = None
        self.restarts = 0  # replacements started
        self._changed = threading.Condition()  # guards what follows; notified when a start ends
        self._failures = 0  # children lost in a row before answering, and failed starts
        self._down: _Down | None = None
        self._starting: Child | None = None
        self._restarting = False  # a start is under way (not a back-off wait)
        self._shut_down = False
        self._generation = 1
        self.child = spawn(owner, factory, 1)

    # ------------------------------------------------------------------ the call path
    def serving(self, op: str) -> Child:
        """The child to send ``op`` to (the first may still be starting); ``BackendError`` at
        once when none serves."""
        with self._changed:
            if self._shut_down:
                raise BackendError(f"{self.name}: the backend process was shut down")
            child = self.child
            if self._down is None and child.ready and not child.alive:
                self._lose(child, f"was found dead before {op}")
            if self._down is not None:
                raise BackendError(self._message(self._down))
            return child

    def lost(self, child: Child, why: str) -> None:
        """``child`` died or did not answer in time: kill it and replace it (after a back-off
        when it never answered a call)."""
        with self._changed:
            if child is self.child and self._down is None and not self._shut_down:
                self._lose(child, why)
                return
        child.kill()

    def _lose(self, child: Child, why: str) -> None:
        child.kill()
        self._failures = 0 if child.answered else self._failures + 1
        wait = self._backoff()
        self._down = _Down(time.time(), why, time.monotonic() + wait)
        log.warning(
            "%s: the backend process (pid %d, exit code %s) %s; restarting it%s",
            self.name,
            child.proc.pid,
            child.proc.returncode,
            why,
            f" in {wait:.1f} s" if wait else "",
        )
        self._restarting = not wait
        threading.Thread(target=self._restart, name=f"{self.name}-restart", daemon=True).start()

    def _backoff(self) -> float:
        first, longest = self._backoff_s
        return 0.0 if not self._failures else min(longest, first * 2 ** (self._failures - 1))

    def _message(self, down: _Down) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(down.since))
        wait = down.retry_at - time.monotonic()
        then = "a new one is starting" if self._restarting or wait <= 0 else f"next restart in {wait:.1f} s"
        return f"{self.name}: the backend process is not running (since {since}: {down.why}); {then}"

    # ------------------------------------------------------------------ the background
    def _restart(self) -> None:
        """Start replacements, waiting out the back-off before each, until one serves."""
        while True:
            with self._changed:
                while self._down is not None and not self._shut_down and time.monotonic() < self._down.retry_at:
                    self._changed.wait(self._down.retry_at - time.monotonic())
                if self._down is None or self._shut_down:
                    return
                self._restarting = True
                self._generation += 1
                generation = self._generation
            if self._start(generation):
                return

    def _start(self, generation: int) -> bool:
        """One start of a replacement: whether that ends the restart (it serves, or none is
        needed any more)."""
        owner = self._owner()
        if owner is None:  # the backend is gone: nobody to serve
            return True
        child = spawn(owner, self._factory, generation)
        del owner
        with self._changed:
            self.restarts += 1
            if self._shut_down:
                child.kill()
                return True
            self._starting = child
        if self.cpus is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(child.proc.pid, self.cpus)
        try:
            read_start(child, self._start_timeout_s)
        except Exception as e:
            if self._shut_down or not child.stop.alive:  # stopped on purpose (or at exit)
                return True
            child.kill()
            self._start_failed(e)
            return False
        with self._changed:
            self._starting, self._restarting = None, False
            if self._shut_down:
                child.kill()
                return True
            child.built.set()
            self.child, self._down = child, None
            self._changed.notify_all()
        log.info("%s: the restarted backend process (pid %d) serves", self.name, child.proc.pid)
        return True

    def _start_failed(self, e: Exception) -> None:
        with self._changed:
            self._starting, self._restarting = None, False
            self._failures += 1
            wait = self._backoff()
            if self._down is not None:
                self._down.why = f"the restarted backend process failed to start: {e}"
                self._down.retry_at = time.monotonic() + wait
            self._changed.notify_all()
        log.warning("%s: the restarted backend process failed to start (%s); next try in %.1f s", self.name, e, wait)

    # ------------------------------------------------------------------ waiting and stopping
    @property
    def down(self) -> bool:
        return self._down is not None

    def await_restart(self) -> None:
        """Wait for a start under way; ``BackendError`` if none serves after it."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._down is None or not self._restarting or self._shut_down, self._start_timeout_s + 1
            )
            if self._shut_down:
                raise BackendError(f"{self.name}: the backend process was shut down")
            if self._down is not None:
                raise BackendError(self._message(self._down))

    def shutdown(self) -> None:
        """Stop the child, and one being started, for good."""
        with self._changed:
            self._shut_down = True
            starting, self._starting = self._starting, None
            self._changed.notify_all()
        self.child.stop()
        if starting is not None:
            starting.kill()
