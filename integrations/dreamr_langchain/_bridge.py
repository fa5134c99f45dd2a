"""Run the async reasoner from LangChain's synchronous entry points, through the core's one way in.

LangChain's sync entry points (``invoke``, ``stream``, ``batch``, a tool's ``_run``) must work in
any thread, with or without a running event loop in it. The core already has the one bridge for
that: each :class:`~dreamr_stream.Reasoner` owns an event loop that all its requests run on, and
``Reasoner.loop.iterate`` drives an async generator there from sync code (an anyio
``BlockingPortal``; see ``dreamr_stream.engine.owner``). So a sync LangChain call, a sync
``Reasoner.invoke`` and an ``astream`` on some other loop all meet on the same loop and queue on
the same model locks, instead of deadlocking across loops.

The generator given here runs on that loop too (LangChain's update layer is plain anyio), so
the request's stream is read where it is produced and only LangChain's chunks cross threads.
Callers that name no Reasoner share one such loop of this module's own.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Callable, Generator
from typing import TypeVar

from dreamr_stream import Reasoner
from dreamr_stream.engine.owner import OwnerLoop

__all__ = ["iterate_sync"]

T = TypeVar("T")

_guard = threading.Lock()
_shared: OwnerLoop | None = None


def _shared_loop() -> OwnerLoop:
    """The loop for callers that name no Reasoner (their requests still run on its own loop)."""
    global _shared
    with _guard:
        if _shared is None:
            _shared = OwnerLoop(name="dreamr-langchain")
        return _shared


def iterate_sync(
    factory: Callable[[], AsyncGenerator[T, None]], reasoner: Reasoner | None = None
) -> Generator[T, None, None]:
    """Iterate ``factory()`` (an async generator) from synchronous code, in any thread.

    It runs on ``reasoner``'s own event loop when one is given. Exceptions are re-raised in the
    caller's thread; closing the returned generator early cancels the async generator and
    blocks until it has been closed on the loop (its request's lanes cancelled and awaited).
    """
    loop = reasoner.loop if reasoner is not None else _shared_loop()
    return loop.iterate(factory)
