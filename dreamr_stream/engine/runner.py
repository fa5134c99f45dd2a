"""Run blocking model calls off the event loop: one priority lock per model.

Every model call goes through ``ModelRunner.call``: it waits for the model's lock (lower
``priority`` value first, FIFO within a priority), then runs in a worker thread. Calls are short
(one step chunk, one scoring forward), so a cancelled request stops within one call, and
verification (priority 0) overtakes a speculative fallback (priority 1) at the next call.
A runner may fix its model's intra-op threads for every call (``engine.threads``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from dreamr_stream.backends.base import ModelBackend
from dreamr_stream.engine.threads import CpuThreaded

__all__ = ["ModelRunner", "Priority", "PriorityLock"]

T = TypeVar("T")


class Priority:
    VERIFY = 0
    DRAFT = 0
    FALLBACK = 1


class PriorityLock:
    """An async lock whose waiters are served by priority, then arrival order."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, anyio.Event]] = []
        self._counter = itertools.count()

    @property
    def locked(self) -> bool:
        return self._held

    async def acquire(self, priority: int = 0) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        entry = (priority, next(self._counter), anyio.Event())
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2].wait()
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            elif entry[2].is_set():  # woken and cancelled at once: pass the lock on
                self.release()
            raise

    def release(self) -> None:
        if self._waiters:
            _, _, event = heapq.heappop(self._waiters)
            event.set()  # ownership passes directly to the next waiter
        else:
            self._held = False


class ModelRunner:
    """A backend plus its lock and counters; shared by every request on that model."""

    def __init__(self, backend: ModelBackend[Any], name: str, threads: int | None = None) -> None:
        self.backend = backend
        self.name = name
        # intra-op threads of every call (None: as the thread has them); only a backend that
        # can set them takes them
        self.threads = threads if isinstance(backend, CpuThreaded) else None
        self.lock = PriorityLock()
        self.in_flight = 0  # model calls running in a thread now
        self.calls = 0

    async def call(self, fn: Callable[..., T], *args: Any, priority: int = 0, **kwargs: Any) -> T:
        await self.lock.acquire(priority)
        threads = self.threads
        try:
            self.in_flight += 1
            self.calls += 1

            def run() -> T:
                if threads is not None:  # in the worker thread: OpenMP's thread count is per thread
                    self.backend.use_threads(threads)  # type: ignore[attr-defined]
                return fn(*args, **kwargs)

            try:
                # not cancellable: a thread cannot be killed, so a cancelled request waits for
                # its one in-flight call and no model call outlives the request
                return await anyio.to_thread.run_sync(run)
            finally:
                self.in_flight -= 1
        finally:
            self.lock.release()
