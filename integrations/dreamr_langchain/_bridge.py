"""Run the async reasoner from synchronous code: one background event loop for every sync caller.

LangChain's sync entry points (``invoke``, ``stream``, ``batch``, a tool's ``_run``) must work both
with and without a running event loop in the calling thread. We cannot start a loop in a thread
that already runs one, and starting a fresh loop per call (in a new thread) lets two concurrent
sync calls drive the same ``Reasoner`` from two event loops: its per-model locks are loop-bound,
so that deadlocks. Instead every sync call runs its coroutine on one shared daemon loop and
receives the items through a thread-safe queue; leaving early cancels the request on that loop
and waits until its cleanup (cancelling and awaiting every lane) has finished.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from contextlib import aclosing
from typing import Any, TypeVar

__all__ = ["iterate_sync"]

T = TypeVar("T")
_ITEM, _ERROR, _DONE = "item", "error", "done"

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _portal() -> asyncio.AbstractEventLoop:
    """The shared background loop, started on first use (a daemon: it never blocks exit)."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="dreamr-langchain-loop", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def iterate_sync(factory: Callable[[], AsyncGenerator[T, None]]) -> Generator[T, None, None]:
    """Iterate ``factory()`` (an async generator) from synchronous code, in any thread.

    Exceptions are re-raised in the caller's thread. Closing the returned generator early
    cancels the async generator and blocks until it has been closed on the loop.
    """
    loop = _portal()
    if threading.current_thread() is _thread:
        raise RuntimeError("a sync dreamr call was made from the background loop itself; use the async API")
    items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    finished = threading.Event()
    task: asyncio.Task[None] | None = None

    async def pump() -> None:
        try:
            async with aclosing(factory()) as stream:
                async for item in stream:
                    items.put((_ITEM, item))
        except asyncio.CancelledError:  # by cancel() below, or the loop shutting down: never leave a reader hanging
            items.put((_ERROR, RuntimeError("the request was cancelled on the background event loop")))
            raise
        except BaseException as e:  # re-raised in the caller's thread
            items.put((_ERROR, e))
        else:
            items.put((_DONE, None))

    def start() -> None:  # runs on the loop thread, so the task exists before any cancel() below
        nonlocal task
        task = loop.create_task(pump())
        task.add_done_callback(lambda _: finished.set())

    def cancel() -> None:
        if task is not None:
            task.cancel()

    loop.call_soon_threadsafe(start)
    try:
        while True:
            kind, value = items.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        if not finished.is_set():
            loop.call_soon_threadsafe(cancel)
        finished.wait()
