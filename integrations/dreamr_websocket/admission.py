"""A bounded admission queue: at most ``max_active`` requests run, ``max_waiting`` wait, more are busy.

Why bound both: the models are shared, so requests beyond a few only slow each other down
(each waits on the per-model locks), and an unbounded queue turns a traffic burst into
minutes of latency for everyone. Saying "busy" at once lets a client retry or go elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

__all__ = ["Admission", "Busy"]


class Busy(Exception):
    """Every slot is taken and the waiting room is full."""


class Admission:
    def __init__(self, max_active: int, max_waiting: int) -> None:
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.active = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_active)

    @asynccontextmanager
    async def slot(self, on_wait: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[float]:
        """Hold a slot for the block; yields the seconds spent waiting for it.

        ``on_wait(position)`` runs when the request has to wait (e.g. to tell the client).
        Raises ``Busy`` at once when the waiting room is full. Cancellation while waiting
        gives the place up cleanly.
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if self._slots.locked():
            if self.waiting >= self.max_waiting:
                raise Busy(
                    f"the server is busy: {self.active} requests running and {self.waiting} waiting; retry later"
                )
            self.waiting += 1
            try:
                if on_wait is not None:
                    await on_wait(self.waiting)
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()  # free: returns without yielding to the loop
        self.active += 1
        try:
            yield loop.time() - t0
        finally:
            self.active -= 1
            self._slots.release()
