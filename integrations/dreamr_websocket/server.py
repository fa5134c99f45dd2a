"""DreamrServer: one port, the page at ``/``, the stream at ``/ws``, stats at ``/stats``, the
served tasks at ``/tasks``, and the OpenAI-compatible API at ``/v1``.

Why one ``Reasoner`` per task for every connection: the models are loaded once and shared; the
core already serialises calls per model (a priority lock each) and keeps concurrent requests
independent (invariant 6). A server serves one task, or several (a mapping task name ->
Reasoner, ``served.ServedTasks``): a request names its task (``task`` on ``/ws``, ``model`` on
``/v1``), or gets the first. The server adds what the core cannot know: how many requests may
run and wait (``Admission``), who may connect, and what a connection may send. No one client
address may hold more than its share of the connections, or ask faster than its rate: one
client in a loop must not lock out the rest (neither applies on a unix socket, which only its
owner can reach). A WebSocket and an API request share those limits, whatever their task: one
admission, one table of connections, one rate, since every task's models share the machine.

Why Starlette on uvicorn: the API streams over plain HTTP (server-sent events), which needs a
real HTTP server beside the WebSocket; uvicorn's WebSocket side runs on the websockets package,
so the wire behaviour of ``/ws`` (close codes, size limit, pings) is the one it always had. The
gates every route shares (Host, Origin, token, connection room) are one ASGI middleware,
``_Gates``, so that they hold for a streamed response to its last byte.

>>> async with DreamrServer(Reasoner.demo(), ServerSettings(port=0)) as server:
...     print(server.http_url)  # open it in a browser
...     await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from types import TracebackType
from typing import Self

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from dreamr_stream import __version__
from dreamr_stream.errors import ConfigError
from dreamr_stream.reasoner import Reasoner
from dreamr_websocket import routes
from dreamr_websocket.admission import Admission, ConnectionTable, RequestRate, TooManyConnections
from dreamr_websocket.connection import Connection, WebSocketConnection, client_address
from dreamr_websocket.http_protocol import with_head_deadline
from dreamr_websocket.openai_protocol import api_error
from dreamr_websocket.openai_routes import api_routes, error_response
from dreamr_websocket.protocol import CloseCode, HelloMessage, ServerLimits, ServerStats, TaskStats, protocol_schema
from dreamr_websocket.served import ServedTask, ServedTasks
from dreamr_websocket.session import Session
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
WS_PATH = "/ws"
API_PREFIX = "/v1/"
# routes that hold a connection for as long as they run (a WebSocket, a streamed completion)
HELD = {WS_PATH, "/v1/chat/completions"}
GATED = HELD | {"/puzzle", "/tasks", "/stats", "/schema.json", "/v1/models"}
RETRY_AFTER_S = 1.0  # what an API client refused for room is told to wait
STOP_WAIT_S = 10  # how long stop() waits for the connections' requests to end once cancelled


class DreamrServer:
    """The server around one shared ``Reasoner``, or one per task; ``async with`` starts and stops it.

    Inject any Reasoner (the tests use one over scripted fakes), or a mapping task name ->
    Reasoner (ordered: the first is the default task); ``settings.port=0`` picks a free port,
    then read ``port`` / ``http_url`` / ``ws_url`` / ``api_url``.
    """

    def __init__(self, reasoner: Reasoner | Mapping[str, Reasoner], settings: ServerSettings | None = None) -> None:
        self.tasks = ServedTasks(reasoner)
        self.settings = settings or ServerSettings()
        s = self.settings
        self.admission = Admission(s.max_active, s.max_waiting, s.max_held_image_bytes)
        self.rate = RequestRate(s.requests_per_minute) if s.requests_per_minute is not None else None
        self.connections = ConnectionTable(s.max_connections, s.max_connections_per_address)
        self.totals: Counter[str] = Counter(dict.fromkeys(TOTALS, 0))
        self.decode_limiter: anyio.CapacityLimiter | None = None
        self.closing = False  # shutting down: new connections and requests are refused (503)
        self._websockets: set[WebSocketConnection] = set()
        self._running: set[anyio.CancelScope] = set()  # every held connection's, cancelled by stop()
        self._uvicorn: _Uvicorn | None = None
        self._serving: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self._t0 = time.monotonic()
        self.app: ASGIApp = _Gates(self._router(), self)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._uvicorn is not None:
            raise ConfigError("the server is already started")
        self.decode_limiter = anyio.CapacityLimiter(2)  # image decoding threads, beside the model threads
        self.closing = False
        s = self.settings
        sock = _listening_socket(s)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            http=with_head_deadline(s.head_timeout_s),  # h11, with a deadline on a first request's head
            ws="websockets-sansio",  # the websockets package: the wire behaviour /ws always had
            ws_max_size=s.max_message_bytes,
            ws_ping_interval=s.ping_interval_s,
            ws_ping_timeout=s.ping_interval_s,
            ws_per_message_deflate=False,  # max_size then bounds the bytes on the wire, not a decompressed size
            log_config=None,  # the application configures logging, not the server
            access_log=False,
            server_header=False,
            headers=[("server", f"dreamr-websocket/{__version__}")],
            timeout_graceful_shutdown=STOP_WAIT_S,
        )
        server = _Uvicorn(config)
        self._serving = asyncio.create_task(server.serve(sockets=[sock]), name="dreamr-server")
        while not server.started and not self._serving.done():  # noqa: ASYNC110 - uvicorn sets a flag
            await asyncio.sleep(0.01)
        if self._serving.done():  # it failed to start: its exception says why
            sock.close()
            self._serving.result()
            raise ConfigError("the server stopped as it started")
        self._uvicorn, self._socket = server, sock
        self._t0 = time.monotonic()
        log.info("serving on %s", s.unix_path or self.http_url)

    async def stop(self) -> None:
        """Refuse new work, close every WebSocket (1001), cancel every request, and wait for them."""
        if self._uvicorn is None:
            return
        self.closing = True
        # a WebSocket's session ends when its connection closes, and awaits its request first (a
        # cancelled scope would cut that short); an API request is cancelled through its scope
        going_away = "the server is shutting down"
        await asyncio.gather(*(ws.close(CloseCode.GOING_AWAY, going_away) for ws in self._websockets))
        for scope in self._running:
            scope.cancel()
        with anyio.move_on_after(STOP_WAIT_S):
            while self.connections.total:  # noqa: ASYNC110 - a count, not an event
                await asyncio.sleep(0.02)
        self._uvicorn.should_exit = True
        assert self._serving is not None
        await self._serving
        self._uvicorn = self._serving = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        assert self._serving is not None, "start() first"
        await asyncio.shield(self._serving)

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        assert self._socket is not None, "start() first"
        return int(self._socket.getsockname()[1])

    @property
    def http_url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return self.http_url.replace("http://", "ws://", 1) + "ws"

    @property
    def api_url(self) -> str:
        """The OpenAI clients' ``base_url``."""
        return self.http_url + "v1"

    # ------------------------------------------------------------------ state
    @property
    def reasoner(self) -> Reasoner:
        """The default task's Reasoner (the only one of a server that serves one task)."""
        return self.tasks.default.reasoner

    def stats(self) -> ServerStats:
        tasks = {served.name: _task_stats(served) for served in self.tasks}
        default = tasks[self.tasks.default.name]
        return ServerStats(
            uptime_s=round(time.monotonic() - self._t0, 3),
            connections=self.connections.total,
            active_requests=self.admission.active,
            queued=self.admission.waiting,
            engine_requests=default.engine_requests,
            in_flight=default.in_flight,
            max_active=self.admission.max_active,
            max_waiting=self.admission.max_waiting,
            totals=dict(self.totals),
            speculation=default.speculation,
            tasks=tasks,
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

    def model_ids(self) -> list[str]:
        """The API's model ids: one per served task (``dreamr-<task>``), the default first."""
        return self.tasks.model_ids

    # ------------------------------------------------------------------ routes
    def _router(self) -> Starlette:
        table: list[Route | WebSocketRoute] = [
            WebSocketRoute(WS_PATH, self._websocket),
            Route("/puzzle", lambda request: routes.puzzle_response(request, self.tasks)),
            Route("/tasks", lambda _request: routes.json_response(routes.served_tasks(self.tasks))),
            Route("/stats", lambda _request: routes.json_response(self.stats())),
            Route("/schema.json", lambda _request: routes.json_response(protocol_schema())),
            *api_routes(self),
        ]
        if self.settings.serve_page:
            table += [Route(path, _static(name, content_type)) for path, (name, content_type) in routes.STATIC.items()]
        return Starlette(routes=table)

    async def _websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        connection = WebSocketConnection(websocket, abort=lambda: self.abort(websocket.scope))
        self._websockets.add(connection)
        try:
            await self.handle(connection)
        finally:
            self._websockets.discard(connection)

    async def handle(self, ws: Connection) -> None:
        """Serve one WebSocket to its end (a subclass may wrap it: count it, or turn it away)."""
        await Session(ws, self).run()

    def abort(self, scope: Scope) -> None:
        """Drop the connection that serves ``scope`` at once (ASGI itself cannot: a client that
        stopped reading would hold its socket and buffers until the kernel gives up)."""
        if self._uvicorn is None:
            return
        for protocol in list(self._uvicorn.server_state.connections):
            if getattr(protocol, "scope", None) is scope:
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abort()
                return

    # ------------------------------------------------------------------ the gates' accounting
    @contextlib.contextmanager
    def holding(self, address: str | None, *, cancel_on_stop: bool) -> Iterator[None]:
        """A connection from ``address`` held for the block (cancelled by ``stop`` if told);
        raises ``TooManyConnections`` at once when there is no room."""
        with self.connections.hold(address), anyio.CancelScope() as scope:
            if cancel_on_stop:
                self._running.add(scope)
            try:
                yield
            finally:
                self._running.discard(scope)


def _task_stats(served: ServedTask) -> TaskStats:
    reasoner = served.reasoner
    return TaskStats(
        model=served.model,
        requests=served.requests,
        engine_requests=reasoner.active_requests,
        in_flight=reasoner.in_flight,
        speculation=reasoner.speculation_plan() if reasoner.draft is not None else None,
    )


def _static(name: str, content_type: str) -> Callable[[Request], Response]:
    def page(_request: Request) -> Response:
        return routes.response(HTTPStatus.OK, routes.static_file(name), content_type)

    return page


class _Gates:
    """Every request passes here first: Host, then the path, Origin, token and connection room.

    A refusal of a WebSocket is an HTTP response to its handshake (the ASGI denial-response
    extension), as it always was; an API route's refusals are OpenAI error objects, so that an
    OpenAI client reads them as it reads any server's."""

    def __init__(self, app: ASGIApp, server: DreamrServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        refusal = self._refusal(connection)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        path: str = scope["path"]
        if path not in HELD or scope.get("method", "GET") != ("GET" if path == WS_PATH else "POST"):
            await self.app(scope, receive, send)
            return
        address = client_address(connection)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.server.holding(address, cancel_on_stop=path != WS_PATH))
            except TooManyConnections as e:
                if e.per_address:
                    log.info("refused a connection from %s: it holds %d", address, self.server.connections.of(address))
                status = HTTPStatus.TOO_MANY_REQUESTS if e.per_address else HTTPStatus.SERVICE_UNAVAILABLE
                await self._refuse(scope, path, status, str(e))(scope, receive, send)
                return
            await self.app(scope, receive, send)

    def _refusal(self, request: HTTPConnection) -> Response | None:
        s = self.server.settings
        path = request.url.path
        if not routes.host_allowed(request, s):
            return self._refuse(request.scope, path, HTTPStatus.FORBIDDEN, "this Host is not allowed")
        if path in routes.STATIC and s.serve_page:
            return None
        if path not in GATED:
            return self._refuse(request.scope, path, HTTPStatus.NOT_FOUND, "not found")
        if (path == WS_PATH or path.startswith(API_PREFIX)) and not routes.origin_allowed(request, s):
            return self._refuse(request.scope, path, HTTPStatus.FORBIDDEN, "this Origin is not allowed")
        if not routes.token_ok(request, s.token, allow_query=path == WS_PATH):
            return self._refuse(request.scope, path, HTTPStatus.UNAUTHORIZED, "a valid token is required")
        if path in HELD and self.server.closing:
            return self._refuse(request.scope, path, HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
        return None

    @staticmethod
    def _refuse(scope: Scope, path: str, status: HTTPStatus, message: str) -> Response:
        if path.startswith(API_PREFIX) and scope["type"] == "http":
            code = "not_found" if status == HTTPStatus.NOT_FOUND else None  # a path, not a model
            retry_after_s = (
                RETRY_AFTER_S if status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE) else None
            )
            return error_response(api_error(status, message, code=code, retry_after_s=retry_after_s))
        if scope["type"] == "websocket" and status == HTTPStatus.TOO_MANY_REQUESTS:
            status = HTTPStatus.SERVICE_UNAVAILABLE  # what a WebSocket client was always told
        return routes.text_response(status, message)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handlers: the application owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listening_socket(settings: ServerSettings) -> socket.socket:
    """The socket to serve on, bound (not yet listening). A unix socket is made 0600 before it
    listens, so there is no moment when another user could connect."""
    if settings.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(settings.unix_path)
            os.chmod(settings.unix_path, 0o600)
        except OSError:
            sock.close()
            raise
        return sock
    family, kind, proto, _, address = socket.getaddrinfo(
        settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def run(
    reasoner: Reasoner | Mapping[str, Reasoner],
    settings: ServerSettings,
    *,
    on_ready: Callable[[DreamrServer], None] | None = None,
) -> None:
    """Serve ``reasoner`` (or each task's, a mapping task name -> Reasoner, the default first)
    until SIGINT or SIGTERM, then close connections and cancel their requests."""

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
