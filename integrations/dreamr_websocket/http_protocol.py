"""uvicorn's HTTP/1.1 protocol with a deadline on a connection's first request head.

Why: uvicorn closes a connection that idles between requests (its keep-alive timeout), but not
one that never finishes its first request head: a client could open connections and send
nothing, or a byte now and then (slowloris), and hold a socket and its buffers each for ever,
before any gate of the application could see it. The websockets server this one replaced gave a
handshake 10 s (its ``open_timeout``); this gives a head the same, whatever the route. A
WebSocket's head is complete once it upgrades, so a live WebSocket is never touched.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEAD_TIMEOUT_S", "HeadDeadlineH11Protocol", "with_head_deadline"]

HEAD_TIMEOUT_S = 10.0


class HeadDeadlineH11Protocol(H11Protocol):
    """``H11Protocol`` that drops a connection whose first request head has not arrived in time."""

    head_timeout_s: float = HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        # ``scope`` is set once a request head is parsed (a WebSocket's included, before it upgrades)
        if self.scope is None and not self.transport.is_closing():
            self.transport.abort()


def with_head_deadline(timeout_s: float) -> type[HeadDeadlineH11Protocol]:
    """The protocol class with its own deadline (uvicorn takes a class, not an instance)."""
    return type("HeadDeadlineH11Protocol", (HeadDeadlineH11Protocol,), {"head_timeout_s": timeout_s})
