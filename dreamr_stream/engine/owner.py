"""The one event loop that owns a Reasoner's shared state, and the ways into it from anywhere.

Why one loop: what a Reasoner shares between requests belongs to an event loop: the per-model
priority locks (``engine.runner``), the request counters, a Redis store's connections
(``redis.asyncio``), a served model's HTTP connection pool. Driving one Reasoner from two loops
(a sync ``invoke``'s loop beside a WebSocket server's, or two threads each in ``anyio.run``)
deadlocked on the locks. Making each of those objects thread-safe would have to be redone for
every store and backend; instead every request runs on one loop that the Reasoner owns, in a
daemon thread of its own (started on first use), and every caller is routed to it through an
anyio ``BlockingPortal``:

* sync code in any thread: :meth:`OwnerLoop.call` and :meth:`OwnerLoop.iterate` (blocking);
* async code on any other loop, asyncio or trio: :meth:`OwnerLoop.acall` and
  :meth:`OwnerLoop.aiterate` (``BlockingPortal.call_async``: cancelling the caller cancels the
  work on the owner loop and waits for it to end);
* code already running on the owner loop (an engine callback): directly, with no hop.

A stream crosses loops as a relay: the async generator runs from start to end in one task on
the owner loop (so its cancel scopes never change tasks, which trio forbids) and hands over one
item at a time through a zero-buffer channel, so it advances only when the consumer asks, as a
local generator would. Leaving early cancels that task and waits for it: when the consumer's
``aclose``/``close`` returns, the generator's cleanup (for a request: cancelling and awaiting
its lanes, so no model call outlives it) has finished.

The cost is a round trip between threads per item for callers outside the owner loop: 85-110 us
per item (asyncio, trio or sync callers; measured on the 2-core development machine under load),
against model calls of milliseconds and a few events per reasoning step.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from concurrent.futures import Future
from contextlib import aclosing
from typing import Any, Generic, Literal, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal

__all__ = ["LoopBackend", "OwnerLoop"]

T = TypeVar("T")
LoopBackend = Literal["asyncio", "trio"]


def _run_loop(backend: LoopBackend, started: Future[tuple[BlockingPortal, TaskGroup]]) -> None:
    """The loop's thread: a portal for callers, a task group for relays, until the portal stops."""

    async def main() -> None:
        async with BlockingPortal() as portal, anyio.create_task_group() as tasks:
            started.set_result((portal, tasks))
            await portal.sleep_until_stopped()
            tasks.cancel_scope.cancel()  # relays still running: their consumers are gone or see the end

    try:
        anyio.run(main, backend=backend)
    except BaseException as e:
        if not started.done():
            started.set_exception(e)
        raise


def _stop(portal: BlockingPortal, thread: threading.Thread) -> None:
    """Ask the loop to stop, without waiting: from any thread, the loop's own included (a
    collected Reasoner may be finalised there), where the portal refuses calls."""
    if threading.current_thread() is thread:
        threading.Thread(target=_stop, args=(portal, thread), name="dreamr-loop-stop", daemon=True).start()
        return
    with contextlib.suppress(RuntimeError):  # already stopped
        portal.start_task_soon(portal.stop)


class _Relay(Generic[T]):
    """An async generator run to its end (or cancelled) in one task on the owner loop.

    Built, run, read and closed on the owner loop only; consumers elsewhere reach ``next`` and
    ``close`` through the portal.
    """

    def __init__(self, factory: Callable[[], AsyncGenerator[T, None]]) -> None:
        self._factory = factory
        self._send, self._recv = anyio.create_memory_object_stream[T](0)
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._error: Exception | None = None

    async def run(self) -> None:
        try:
            with self._scope, self._send:
                async with aclosing(self._factory()) as items:
                    async for item in items:
                        await self._send.send(item)
        except Exception as e:  # raised again in the consumer, in its own thread
            self._error = e
        finally:
            self._done.set()

    async def next(self) -> tuple[bool, Any]:
        """``(False, item)``, or ``(True, None)`` at the end (StopAsyncIteration cannot cross a
        future: inside the consumer's generator it would turn into a RuntimeError)."""
        try:
            return False, await self._recv.receive()
        except anyio.EndOfStream:
            pass
        if self._error is not None:
            raise self._error  # as it was raised, its own cause kept
        return True, None

    async def close(self) -> None:
        """Cancel the generator (a no-op once it ended) and wait until its cleanup is done."""
        self._scope.cancel()
        await self._done.wait()
        self._recv.close()


class OwnerLoop:
    """An event loop in a daemon thread of its own, and the ways into it from any thread or loop.

    ``backend``: the anyio backend the loop runs on. Started on first use; :meth:`close` stops
    it (it is a daemon: an unclosed one never blocks the interpreter's exit).
    """

    def __init__(self, *, name: str = "dreamr-loop", backend: LoopBackend = "asyncio") -> None:
        self.name = name
        self.backend: LoopBackend = backend
        self._guard = threading.Lock()  # starting and stopping, from any thread
        self._portal: BlockingPortal | None = None
        self._tasks: TaskGroup | None = None
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._portal is not None

    @property
    def here(self) -> bool:
        """The calling code runs on this loop's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def _started(self) -> BlockingPortal:
        with self._guard:
            if self._portal is None:
                started: Future[tuple[BlockingPortal, TaskGroup]] = Future()
                thread = threading.Thread(target=_run_loop, args=(self.backend, started), name=self.name, daemon=True)
                thread.start()
                self._portal, self._tasks = started.result()
                self._thread = thread
                # a loop nobody can reach any more stops (its thread is a daemon either way)
                self._finalizer = weakref.finalize(self, _stop, self._portal, thread)
            return self._portal

    def close(self) -> None:
        """Stop the loop and join its thread: streams still running are cancelled (their
        consumers see the end), calls in flight finish first. Calls after this start a new loop."""
        if self.here:
            raise RuntimeError("an OwnerLoop cannot be closed from its own thread")
        with self._guard:
            portal, thread, finalizer = self._portal, self._thread, self._finalizer
            self._portal, self._tasks, self._thread, self._finalizer = None, None, None, None
        if finalizer is not None:
            finalizer.detach()
        if portal is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # stopped already
                portal.call(portal.stop)
            thread.join()

    def _no_sync_here(self, what: str) -> None:
        if self.here:  # it would wait for the loop it blocks
            raise RuntimeError(f"{what} was called on the Reasoner's own event loop; use the async API there")

    # ------------------------------------------------------------------ sync callers
    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the loop and wait for its result (any thread but the loop's)."""
        self._no_sync_here("a sync call")
        return self._started().call(fn, *args)

    def iterate(
        self, factory: Callable[[], AsyncGenerator[T, None]], *, last: Callable[[T], bool] | None = None
    ) -> Generator[T, None, None]:
        """Iterate ``factory()``, run on the loop, from sync code. Closing the returned generator
        early cancels the async generator and returns once its cleanup has finished. ``last``:
        see :meth:`aiterate`."""
        self._no_sync_here("a sync stream")
        portal = self._started()
        relay: _Relay[T] = portal.call(self._spawn, factory)
        ended = False
        try:
            while not ended:
                done, item = portal.call(relay.next)
                if done:
                    ended = True
                    return
                ended = last is not None and last(item)
                yield item
        finally:
            if ended or self.here:  # nothing left to wait for; or collected on the loop, which cannot wait
                self._finish(relay)
            else:
                portal.call(relay.close)

    # ------------------------------------------------------------------ async callers, any loop
    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the loop; cancelling the caller cancels it there and waits."""
        if self.here:
            return await fn(*args)
        return await self._started().call_async(fn, *args)

    async def aiterate(
        self, factory: Callable[[], AsyncGenerator[T, None]], *, last: Callable[[T], bool] | None = None
    ) -> AsyncGenerator[T, None]:
        """Iterate ``factory()``, run on the loop, from any event loop (asyncio or trio).

        ``last(item)`` true: the generator promises that nothing follows that item and that
        its work has ended when it yields it (a request's ``finished``/``failed`` event), so the
        stream ends there without another round trip to the loop.
        """
        if self.here:
            async with aclosing(factory()) as items:
                async for item in items:
                    yield item
            return
        portal = self._started()
        with anyio.CancelScope(shield=True):  # a relay once started is always closed below
            relay: _Relay[T] = await portal.call_async(self._spawn, factory)
        ended = False
        try:
            while not ended:
                done, item = await portal.call_async(relay.next)
                if done:
                    ended = True
                    return
                ended = last is not None and last(item)
                yield item
        finally:
            if ended:
                self._finish(relay)
            else:
                with anyio.CancelScope(shield=True):
                    await portal.call_async(relay.close)

    def _finish(self, relay: _Relay[T]) -> None:
        """Close a relay without waiting for it (from any thread, the loop's own included)."""
        if self.here and self._tasks is not None:
            self._tasks.start_soon(relay.close)
            return
        portal = self._portal
        if portal is not None:
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile: nothing to close
                portal.start_task_soon(relay.close)

    def _spawn(self, factory: Callable[[], AsyncGenerator[T, None]]) -> _Relay[T]:
        """On the loop: start ``factory()`` in a relay task of the loop's own task group."""
        assert self._tasks is not None
        relay = _Relay(factory)
        self._tasks.start_soon(relay.run)
        return relay

    def start_soon(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """On the loop: run ``fn()`` in a task that belongs to the loop, not to the caller's
        task (it may be awaited, or cancelled, from any task of the loop)."""
        if not self.here or self._tasks is None:
            raise RuntimeError("OwnerLoop.start_soon must be called on the loop itself")
        self._tasks.start_soon(fn)
