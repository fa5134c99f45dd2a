"""Admission: a bounded queue for the engine's slots, a request rate per client address, and the
open connections per address.

Why bound the queue: the models are shared, so requests beyond a few only slow each other down
(each waits on the per-model locks), and an unbounded queue turns a traffic burst into minutes
of latency for everyone. Saying "busy" at once lets a client retry or go elsewhere. Why bound
the bytes of images as well as the count: a request holds its decoded image from the moment it
waits until it ends, and a few dozen large uploads would otherwise take gigabytes.

Why a rate per address: one client that asks in a loop would fill the queue for everyone, and
each ask costs a decode before it is even queued; a token bucket lets bursts through and holds
the long-run rate. Why connections per address: a connection costs a place even while it asks
nothing, so one address holding them all would lock everyone else out. A WebSocket and a
streaming HTTP request are both connections here: one table, whatever the route.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

__all__ = ["Admission", "Busy", "ConnectionTable", "RateLimited", "RequestRate", "TooManyConnections"]


class Busy(Exception):
    """Every slot is taken and the waiting room is full, or the images held would be too many bytes."""


class RateLimited(Exception):
    """This client asked more often than its rate allows; ``retry_after_s`` says when it may again."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyConnections(Exception):
    """The server holds its most connections, or this address its share (``per_address``)."""

    def __init__(self, message: str, *, per_address: bool) -> None:
        super().__init__(message)
        self.per_address = per_address


class ConnectionTable:
    """The open connections, in all and per client address (None: a unix socket, never capped per address)."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self._by_address: Counter[str] = Counter()

    def of(self, address: str | None) -> int:
        return self._by_address[address] if address is not None else 0

    @contextmanager
    def hold(self, address: str | None) -> Iterator[None]:
        """One connection from ``address`` for the block; ``TooManyConnections`` at once if there is no room."""
        if self.total >= self.max_total:
            raise TooManyConnections("too many connections; retry later", per_address=False)
        if address is not None and self._by_address[address] >= self.max_per_address:
            raise TooManyConnections("too many connections from this address; retry later", per_address=True)
        self.total += 1
        if address is not None:
            self._by_address[address] += 1
        try:
            yield
        finally:
            self.total -= 1
            if address is not None:
                self._by_address[address] -= 1
                if not self._by_address[address]:
                    del self._by_address[address]


class Admission:
    def __init__(self, max_active: int, max_waiting: int, max_image_bytes: int | None = None) -> None:
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.max_image_bytes = max_image_bytes
        self.active = 0
        self.waiting = 0
        self.image_bytes = 0  # held by the requests running and waiting
        self._slots = asyncio.Semaphore(max_active)

    def _check_room(self, image_bytes: int) -> None:
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise Busy(f"the server is busy: {self.active} requests running and {self.waiting} waiting; retry later")
        if self.max_image_bytes is not None and self.image_bytes + image_bytes > self.max_image_bytes:
            raise Busy(
                f"the server is busy: the requests running and waiting hold {self.image_bytes / 2**20:.0f} MiB "
                f"of images, and this one's {image_bytes / 2**20:.1f} MiB would pass the limit of "
                f"{self.max_image_bytes / 2**20:.0f} MiB; retry later"
            )

    @asynccontextmanager
    async def slot(
        self, on_wait: Callable[[int], Awaitable[None]] | None = None, *, image_bytes: int = 0
    ) -> AsyncIterator[float]:
        """Hold a slot for the block; yields the seconds spent waiting for it.

        ``image_bytes`` (the request's decoded image) count against the budget from now until
        the block ends. ``on_wait(position)`` runs when the request has to wait (e.g. to tell
        the client). Raises ``Busy`` at once when the waiting room is full or the image would
        pass the budget. Cancellation while waiting gives the place up cleanly.
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self._check_room(image_bytes)
        self.image_bytes += image_bytes
        try:
            if self._slots.locked():
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
        finally:
            self.image_bytes -= image_bytes


class RequestRate:
    """A token bucket per client address: ``per_minute`` requests a minute, in bursts up to as many.

    A bucket that has filled up again is the same as none, so full buckets are forgotten once
    there are many: the table stays as small as the set of clients asking within a minute.
    """

    PRUNE_AT = 4096  # buckets kept before the full ones are dropped

    def __init__(self, per_minute: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.per_second = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def __len__(self) -> int:
        """The addresses with a bucket now."""
        return len(self._buckets)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.per_second)

    def take(self, address: str) -> None:
        """Count one request from ``address``; raises ``RateLimited`` if its bucket is empty."""
        now = self._clock()
        tokens = self._tokens(address, now)
        if tokens < 1.0:
            retry_after_s = (1.0 - tokens) / self.per_second
            raise RateLimited(
                f"too many requests: at most {self.per_minute:g} a minute from one address; "
                f"retry in {retry_after_s:.1f} s",
                retry_after_s,
            )
        if len(self._buckets) >= self.PRUNE_AT and address not in self._buckets:
            self._buckets = {a: b for a, b in self._buckets.items() if self._tokens(a, now) < self.capacity}
        self._buckets[address] = (tokens - 1.0, now)
