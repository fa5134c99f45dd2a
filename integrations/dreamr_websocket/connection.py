"""A WebSocket as a session uses it: receive, send, close, abort, and the client's address.

Why a seam of its own: the server runs on an ASGI server (uvicorn), and a session should not
care how the frames travel. ``Connection`` is the five things a session does with its client;
``WebSocketConnection`` is Starlette's ``WebSocket`` behind it, with ASGI's disconnect messages
and state errors turned into the one exception a session handles, ``ClientGone``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = ["ClientGone", "Connection", "WebSocketConnection", "client_address"]

log = logging.getLogger(__name__)
CLOSE_WAIT_S = 5.0  # a close frame that cannot be written this soon (a client not reading) aborts instead


def client_address(connection: HTTPConnection) -> str | None:
    """The client's IP address, what the per-address limits count; None on a unix socket (only
    its owner can connect), which they never limit."""
    client = connection.client
    return client.host if client is not None and client.host else None


class ClientGone(Exception):
    """The client closed the connection, or it was aborted because the client stopped reading."""


class Connection(Protocol):
    """One client's WebSocket, as a session sees it."""

    @property
    def address(self) -> str | None:
        """The client's IP address; None on a unix socket (only its owner can connect)."""
        ...

    async def recv(self) -> str | bytes:
        """The next message; raises ``ClientGone`` once the connection is closed."""
        ...

    async def send(self, text: str) -> None:
        """Send a text frame; raises ``ClientGone`` if the connection is closed."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (idempotent; never raises)."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (a client that stopped reading)."""
        ...


class WebSocketConnection:
    """Starlette's accepted ``WebSocket`` as a ``Connection``.

    ``abort`` is the server's: ASGI has no way to drop a connection, so the server finds the
    transport behind this connection's scope (see ``DreamrServer``)."""

    def __init__(self, websocket: WebSocket, abort: Callable[[], None]) -> None:
        self.websocket = websocket
        self._abort = abort
        self.closed = False
        self.close_code: int | None = None  # the code the connection closed with, once it has

    @property
    def address(self) -> str | None:
        return client_address(self.websocket)

    async def recv(self) -> str | bytes:
        if self.closed:
            raise ClientGone("the connection is closed")
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            self.closed = True
            self.close_code = int(message.get("code", 1005))
            raise ClientGone(f"the connection closed ({self.close_code})")
        text = message.get("text")
        return text if text is not None else bytes(message.get("bytes") or b"")

    async def send(self, text: str) -> None:
        if self.closed:
            raise ClientGone("the connection is closed")
        try:
            await self.websocket.send_text(text)
        except (WebSocketDisconnect, RuntimeError) as e:  # RuntimeError: Starlette's "after close"
            self.closed = True
            raise ClientGone(str(e) or "the connection is closed") from e

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):  # the frame waits behind a full write buffer
                await self.websocket.close(code, reason)
        except TimeoutError:
            self.abort()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # gone already: nothing to close

    def abort(self) -> None:
        self.closed = True
        self._abort()
