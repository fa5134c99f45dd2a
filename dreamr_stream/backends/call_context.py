"""What the engine tells a backend about the call it is making, beside the call's arguments.

Two things travel with a model call in context variables, so that the backend protocol's
signatures stay as they are (a context variable follows a call into the coroutine it awaits and
into the worker thread that runs a blocking call):

* a *limit*: ``calls_within(seconds)`` caps every model call made in that context (the task and
  the tasks it starts) at ``seconds``. The engine sets it from a model's role: a draft call slower
  than a few seconds is worth nothing, since the target writes the step meanwhile, whereas a
  target's call may rightly take as long as its own deadline. A backend reads it with
  ``limit_s(own_deadline)``, so that the call's failure is its own (a served model's circuit
  breaker counts it) rather than a cancellation from outside, which would count neither way;
* *abandonment*: a blocking call whose caller was cancelled is abandoned (the caller goes on at
  once, the worker thread keeps running). A backend that can settle such a call by itself says
  so (``Capabilities.abandonable``) and reads ``current_watch()`` in the call: its ``abandoned_at``
  turns from None to the time the caller left (e.g. a child process's reply is then awaited for
  a short grace, and the child killed past it, instead of the call's whole deadline).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["CallWatch", "calls_within", "current_watch", "limit_s", "watching"]

_LIMIT_S: ContextVar[float | None] = ContextVar("dreamr_call_limit_s", default=None)
_WATCH: ContextVar[CallWatch | None] = ContextVar("dreamr_call_watch", default=None)


@contextlib.contextmanager
def calls_within(seconds: float | None) -> Iterator[None]:
    """Every model call made in this context ends within ``seconds`` (None: no limit here); an
    enclosing limit that is tighter still holds."""
    if seconds is None:
        yield
        return
    outer = _LIMIT_S.get()
    token = _LIMIT_S.set(seconds if outer is None else min(outer, seconds))
    try:
        yield
    finally:
        _LIMIT_S.reset(token)


def limit_s(own_s: float) -> float:
    """The deadline of one call of a backend whose own deadline is ``own_s``: the context's limit
    when that is tighter."""
    limit = _LIMIT_S.get()
    return own_s if limit is None else min(own_s, limit)


@dataclass
class CallWatch:
    """One blocking call as its caller sees it: ``abandoned_at`` (``time.monotonic()``) is set once
    the caller has gone without waiting for it. A single attribute written once, from the event
    loop, and read by the worker thread: no lock needed."""

    abandoned_at: float | None = None

    def abandon(self) -> None:
        if self.abandoned_at is None:
            self.abandoned_at = time.monotonic()


@contextlib.contextmanager
def watching(watch: CallWatch) -> Iterator[None]:
    """Make ``watch`` the current call's (in the worker thread that makes the call)."""
    token = _WATCH.set(watch)
    try:
        yield
    finally:
        _WATCH.reset(token)


def current_watch() -> CallWatch | None:
    """The watch of the call being made (None: a call nobody can abandon)."""
    return _WATCH.get()
