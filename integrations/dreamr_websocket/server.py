"""DreamrServer: one port, the page at ``/``, the stream at ``/ws``, stats at ``/stats``.

Why one ``Reasoner`` for every connection: the models are loaded once and shared; the
core already serialises calls per model (a priority lock each) and keeps concurrent requests
independent (invariant 6). The server adds what the core cannot know: how many requests may
run and wait (``Admission``), who may connect, and what a connection may send. No one client
address may hold more than its share of the connections, or ask faster than its rate: one
client in a loop must not lock out the rest (neither applies on a unix socket, which only its
owner can reach).

>>> async with DreamrServer(Reasoner.demo(), ServerSettings(port=0)) as server:
...     print(server.http_url)  # open it in a browser
...     await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import anyio
from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.http11 import Request, Response

from dreamr_stream import __version__
from dreamr_stream.errors import ConfigError
from dreamr_stream.reasoner import Reasoner
from dreamr_websocket import routes
from dreamr_websocket.admission import Admission, RequestRate
from dreamr_websocket.protocol import HelloMessage, ServerLimits, ServerStats, protocol_schema
from dreamr_websocket.session import Session, client_address
from dreamr_websocket.settings import ServerSettings

__all__ = ["DreamrServer", "run"]

log = logging.getLogger(__name__)
METHODS = ["fpsr", "sequential", "target_only", "draft_only"]
TOTALS = (
    "connections",
    "requests",
    "completed",
    "failed",
    "cancelled",
    "client_gone",
    "busy",
    "rate_limited",
    "rejected_input",
    "bad_messages",
    "slow_client_aborts",
    "idle_timeouts",
    "internal_errors",
)


class DreamrServer:
    """The server around one shared ``Reasoner``; ``async with`` starts and stops it.

    Inject any Reasoner (the tests use one over scripted fakes); ``settings.port=0`` picks a
    free port, then read ``port`` / ``http_url`` / ``ws_url``.
    """

    def __init__(self, reasoner: Reasoner, settings: ServerSettings | None = None) -> None:
        self.reasoner = reasoner
        self.settings = settings or ServerSettings()
        s = self.settings
        self.admission = Admission(s.max_active, s.max_waiting, s.max_held_image_bytes)
        self.rate = RequestRate(s.requests_per_minute) if s.requests_per_minute is not None else None
        self.totals: Counter[str] = Counter(dict.fromkeys(TOTALS, 0))
        self.decode_limiter: anyio.CapacityLimiter | None = None
        self._server: Server | None = None
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._server is not None:
            raise ConfigError("the server is already started")
        self.decode_limiter = anyio.CapacityLimiter(2)  # image decoding threads, beside the model threads
        s = self.settings
        options: dict[str, Any] = {
            "process_request": self._process_request,
            "compression": None,  # max_size then bounds the bytes on the wire, not a decompressed size
            "max_size": s.max_message_bytes,
            "ping_interval": s.ping_interval_s,
            "server_header": f"dreamr-websocket/{__version__}",
        }
        if s.unix_path is not None:
            self._server = await unix_serve(self.handle, s.unix_path, **options)
            os.chmod(s.unix_path, 0o600)  # its folder should be 0700 too: this closes the gap where it is not
        else:
            self._server = await serve(self.handle, s.host, s.port, **options)
        self._t0 = time.monotonic()
        log.info("serving on %s", s.unix_path or self.http_url)

    async def stop(self) -> None:
        """Close every connection (code 1001); their requests are cancelled and awaited."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.serve_forever()

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def http_url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return self.http_url.replace("http://", "ws://", 1) + "ws"

    # ------------------------------------------------------------------ state
    def stats(self) -> ServerStats:
        return ServerStats(
            uptime_s=round(time.monotonic() - self._t0, 3),
            connections=len(self._server.connections) if self._server is not None else 0,
            active_requests=self.admission.active,
            queued=self.admission.waiting,
            engine_requests=self.reasoner.active_requests,
            in_flight=self.reasoner.in_flight,
            max_active=self.admission.max_active,
            max_waiting=self.admission.max_waiting,
            totals=dict(self.totals),
        )

    def hello(self) -> HelloMessage:
        cfg = self.reasoner.config
        methods = METHODS if self.reasoner.draft is not None else ["target_only"]
        limits = ServerLimits(
            max_message_bytes=self.settings.max_message_bytes,
            max_image_bytes=cfg.limits.max_image_bytes,
            max_question_chars=cfg.limits.max_question_chars,
            max_steps=cfg.generation.max_steps,
        )
        return HelloMessage(version=__version__, methods=methods, limits=limits)

    # ------------------------------------------------------------------ HTTP + handshake
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Route plain HTTP and gate the WebSocket handshake (None = go on with the upgrade)."""
        s = self.settings
        path = urlsplit(request.path).path
        if not routes.host_allowed(request, s):
            return connection.respond(HTTPStatus.FORBIDDEN, "this Host is not allowed\n")
        if path in routes.STATIC and s.serve_page:
            name, content_type = routes.STATIC[path]
            return routes.response(HTTPStatus.OK, routes.static_file(name), content_type)
        if path not in ("/ws", "/puzzle", "/stats", "/schema.json"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if path == "/ws" and not routes.origin_allowed(request, s):
            return connection.respond(HTTPStatus.FORBIDDEN, "this Origin is not allowed\n")
        if not routes.token_ok(request, s.token):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "a valid token is required\n")
        if path == "/ws":
            return self._room_for(connection)
        if path == "/stats":
            return routes.json_response(self.stats())
        if path == "/schema.json":
            return routes.json_response(protocol_schema())
        return routes.puzzle_response(request)

    def _room_for(self, connection: ServerConnection) -> Response | None:
        """None if the server, and the client's share of it, has room for one more connection."""
        open_now = self._server.connections if self._server is not None else set()
        if len(open_now) >= self.settings.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry later\n")
        address = client_address(connection)
        if address is not None:
            mine = sum(1 for c in open_now if client_address(c) == address)
            if mine >= self.settings.max_connections_per_address:
                log.info("refused a connection from %s: it holds %d already", address, mine)
                return connection.respond(
                    HTTPStatus.SERVICE_UNAVAILABLE, "too many connections from this address; retry later\n"
                )
        return None

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one connection to its end (a subclass may wrap it: count it, or turn it away)."""
        await Session(ws, self).run()


def run(
    reasoner: Reasoner, settings: ServerSettings, *, on_ready: Callable[[DreamrServer], None] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then close connections and cancel their requests."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with DreamrServer(reasoner, settings) as server:
            if on_ready is not None:
                on_ready(server)
            await stop.wait()
            log.info("shutting down")

    asyncio.run(main())
