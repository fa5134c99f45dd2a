"""The thin client of ``dreamr reason``: connect to the resident daemon that holds the models
(started or joined through ``files``), then stream the request through it.

Why a daemon: importing torch and transformers alone takes 4-6 s, and loading the models more,
so a command that does both cannot show a step within 2 s. A process that keeps the models
loaded (``python -m dreamr_app.daemon.server``) answers the next ``dreamr reason`` at once. It
serves the WebSocket protocol of ``dreamr serve`` (``dreamr_websocket.protocol``) on a unix socket.

This module is the client's whole path, so it imports only the standard library, rich, PIL,
pydantic, websockets and light modules (``dreamr_app.reason`` for the request and its output):
never torch, transformers, or a module that imports them (tests/test_reason_daemon.py checks it
in a fresh process).

A daemon may exit (idle, or stopped) just as a command connects. It then closes the connections
that have asked nothing with ``NOT_SERVED``, and refuses their late requests the same way, so
that a client knows its request did not run and sends it once more, to a fresh daemon. A request
the daemon may have started is never sent again: its loss is reported instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from dreamr_app.common import EXIT_FAILED, Request, UsageError, check_device
from dreamr_app.daemon.files import (
    NOT_SERVED_CODE,
    DaemonFailed,
    DaemonFiles,
    daemon_key,
    identity,
    idle_timeout,
    runtime_dir,
    start_or_join,
)
from dreamr_app.reason import read_request, run, warn
from dreamr_stream.errors import DreamrError

if TYPE_CHECKING:
    from dreamr_websocket.protocol import RequestOptions, ServerMessage
    from websockets.asyncio.client import ClientConnection
    from websockets.exceptions import ConnectionClosed

    from dreamr_stream.events import Event
    from dreamr_stream.types import ReasoningResult

__all__ = ["NotServed", "RemoteEngine", "connect", "reason"]

_WS_URI = "ws://localhost/ws"  # the Host a loopback server accepts; the socket path says where


class NotServed(DreamrError):
    """The daemon went away before it accepted the request: it did not run, so it may be sent again."""


def _not_served(e: ConnectionClosed) -> bool:
    return e.rcvd is not None and e.rcvd.code == NOT_SERVED_CODE


async def connect(files: DaemonFiles) -> ClientConnection | None:
    """A connection to the daemon serving ``files``, past its hello; None if none serves."""
    from dreamr_websocket.protocol import HelloMessage, ServerMessageAdapter
    from websockets.asyncio.client import unix_connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    if not files.socket.exists():
        return None
    try:
        ws = await unix_connect(str(files.socket), uri=_WS_URI, compression=None, max_size=None, open_timeout=10)
    except (OSError, InvalidHandshake, TimeoutError):  # refused: a stale socket (its daemon died)
        return None
    try:
        hello = ServerMessageAdapter.validate_json(await ws.recv())
    except ConnectionClosed:  # it is shutting down (NOT_SERVED: it began to before this connection)
        return None
    if not isinstance(hello, HelloMessage):
        await ws.close()
        raise DreamrError(f"{files.socket}: not a dreamr daemon (it said {hello.type!r} first)")
    return ws


# ---------------------------------------------------------------------------------- requests
def _to_event(message: ServerMessage, answer: Any, question: str, method: str) -> Event | None:
    """The core event a wire message stands for (``answer`` + ``stats`` make ``finished``), or None."""
    from dreamr_websocket.protocol import (
        AnswerMessage,
        CancelledMessage,
        ErrorMessage,
        HelloMessage,
        QueuedMessage,
        StatsMessage,
    )

    from dreamr_stream.events import EventAdapter, FailedEvent, FinishedEvent
    from dreamr_stream.types import ReasoningResult

    match message:
        case HelloMessage() | QueuedMessage() | AnswerMessage():
            return None
        case StatsMessage(stats=stats):
            result = ReasoningResult(
                question=question, steps=answer.steps, answer=answer.answer, stats=stats, method=method
            )
            return FinishedEvent(result=result, elapsed_s=answer.elapsed_s)
        case ErrorMessage(code=code, message=text):
            # a failed request's message is "ErrorClass: what happened"; other errors have their code
            error, sep, rest = text.partition(": ")
            named = sep and error.isidentifier() and error[:1].isupper()
            return FailedEvent(error=error if named else code, message=rest if named else text)
        case CancelledMessage():
            return FailedEvent(error="Cancelled", message="the daemon cancelled the request")
        case _:
            return EventAdapter.validate_python(message.model_dump(exclude={"v", "id"}))


Reconnect = Callable[[], Awaitable["ClientConnection"]]


class RemoteEngine:
    """``reason.Engine`` over a daemon's connection: the same events, rebuilt from its messages.

    ``reconnect`` gives a connection to a fresh daemon; it is called at most once per command, when
    the daemon went away before it accepted a request (``NotServed``)."""

    def __init__(
        self, ws: ClientConnection, args: argparse.Namespace, files: DaemonFiles, reconnect: Reconnect | None = None
    ) -> None:
        self.ws = ws
        self.args = args
        self.files = files
        self._reconnect = reconnect
        self._ids = itertools.count(1)
        self._image: tuple[int, str] | None = None  # the last request's image, encoded once

    async def close(self) -> None:
        await self.ws.close()

    def _encoded(self, request: Request) -> str:
        if self._image is None or self._image[0] != id(request.image):
            buffer = io.BytesIO()
            request.image.save(buffer, format="PNG")  # lossless: the daemon sees the pixels this command read
            self._image = (id(request.image), base64.b64encode(buffer.getvalue()).decode("ascii"))
        return self._image[1]

    def _options(self, method: str, max_steps: int | None = None, *, alone: bool = False) -> RequestOptions:
        """The flags as request options; the same config ``dreamr reason --no-daemon`` builds from them.
        A flag the protocol refuses (``--tau inf``: a client's tau is finite) is a usage error."""
        from dreamr_websocket.protocol import RequestOptions
        from pydantic import ValidationError

        steps = max_steps or self.args.max_steps
        fields = {
            "method": method,
            "tau": self.args.tau,
            "verify": self.args.verify,
            "lookahead": min(self.args.lookahead, steps),
            "fallback": self.args.fallback,
            "max_steps": steps,
            # off: a repeated question must not become a cache hit because the models stayed
            # loaded, or the output would differ from --no-daemon's (its cache starts empty)
            "cache": False,
            "drafts": bool(self.args.events) and not alone,
            "timeline": alone,  # the estimate of the target alone reads its prefill from it
        }
        try:
            return RequestOptions.model_validate(fields)
        except ValidationError as e:
            wrong = e.errors(include_input=False, include_url=False)[0]
            flag = "--" + str(wrong["loc"][0]).replace("_", "-")
            raise UsageError(f"{flag}: {wrong['msg']} (the daemon's protocol refuses it; --no-daemon does not)") from e

    async def _send(self, request: Request, options: RequestOptions) -> None:
        from dreamr_websocket.protocol import AskMessage
        from websockets.exceptions import ConnectionClosed

        ask = AskMessage(id=f"r{next(self._ids)}", image=self._encoded(request), question=request.question)
        try:
            await self.ws.send(ask.model_copy(update={"options": options}).model_dump_json())
        except ConnectionClosed as e:  # closed before the request left this process: it cannot have run
            raise NotServed(f"the daemon closed the connection before the request was sent ({e})") from e

    async def _events(self, question: str, method: str) -> AsyncIterator[Event]:
        """The request's events; NotServed, before any, if the daemon says it did not take the request."""
        from dreamr_websocket.protocol import AnswerMessage, ServerMessageAdapter
        from websockets.exceptions import ConnectionClosed

        from dreamr_stream.events import FailedEvent, FinishedEvent

        answer: AnswerMessage | None = None
        received = False
        while True:
            try:
                message = ServerMessageAdapter.validate_json(await self.ws.recv())
            except ConnectionClosed as e:
                if not received and _not_served(e):
                    raise NotServed(f"the daemon refused the request as it exited ({e})") from e
                # the daemon may have started the request (and its model work): sending it again
                # could run it twice, so the command ends here, in one line
                gone = f"the daemon exited during the request ({e}); it was not sent again, as it may have run. Log: "
                gone += str(self.files.log)
                yield FailedEvent(error="DaemonGone", message=gone)
                return
            received = True
            if isinstance(message, AnswerMessage):
                answer = message
            event = _to_event(message, answer, question, method)
            if event is not None:
                yield event
                if isinstance(event, FinishedEvent | FailedEvent):
                    return

    async def _ask(self, request: Request, options: RequestOptions) -> AsyncIterator[Event]:
        """The request's events, sent once more to a fresh daemon if the first did not take it."""
        from dreamr_stream.events import FailedEvent

        method = options.method
        while True:
            try:
                await self._send(request, options)
                # NotServed comes before the first event only, so nothing is shown twice
                async for event in self._events(request.question, method):
                    yield event
                return
            except NotServed as e:
                if self._reconnect is None:
                    yield FailedEvent(error="DaemonGone", message=f"{e}; the daemon's log: {self.files.log}")
                    return
                reconnect, self._reconnect = self._reconnect, None  # once: a second refusal is reported
                await self.ws.close()
                self.ws = await reconnect()

    async def stream(self, request: Request, method: str) -> AsyncIterator[Event]:
        async for event in self._ask(request, self._options(method)):
            yield event

    async def alone(self, request: Request, max_steps: int | None = None) -> ReasoningResult:
        from dreamr_stream.events import FailedEvent, FinishedEvent

        async for event in self._ask(request, self._options("target_only", max_steps, alone=True)):
            if isinstance(event, FinishedEvent):
                return event.result
            if isinstance(event, FailedEvent):
                raise DreamrError(f"{event.error}: {event.message}")
        raise DreamrError("the daemon sent no result")


# ---------------------------------------------------------------------------------- the command
async def _connected(
    files: DaemonFiles, args: argparse.Namespace, ident: dict[str, str], console: Console
) -> ClientConnection:
    """A connection to a ready daemon, started (with a spinner and a note on stderr) if none runs."""
    t0 = time.perf_counter()
    with console.status("loading the models…", spinner="dots"):
        started = await start_or_join(files, args, ident)
        ws = await connect(files)
    if ws is None:
        raise DreamrError(f"the dreamr daemon is ready but refuses connections; see its log {files.log}")
    if started is not None:
        Console(stderr=True, highlight=False).print(
            f"[dim]dreamr: started a daemon (pid {started.pid}) that keeps the models loaded for the next "
            f"`dreamr reason`; it exits after {idle_timeout(args):g} s idle. Stop it: dreamr daemon stop; "
            f"run without it: dreamr reason --no-daemon. Log: {started.log}[/dim]",
            soft_wrap=True,
        )
    console.print(f"[dim]models loaded in {time.perf_counter() - t0:.2f}s[/dim]")
    return ws


async def _ready(args: argparse.Namespace, request: Request, console: Console) -> RemoteEngine:
    """An engine over the daemon for these flags, connected; the device checked and the warnings
    shown first, in the order ``dreamr reason --no-daemon`` has them."""
    ident = identity(args)
    files = DaemonFiles(runtime_dir(), daemon_key(ident))

    async def reconnect() -> ClientConnection:
        Console(stderr=True, highlight=False).print(
            "[dim]dreamr: the daemon exited before it took the request; sending it to a fresh one[/dim]",
            soft_wrap=True,
        )
        return await _connected(files, args, ident, console)

    ws = await connect(files)
    if ws is None:
        check_device(args.device)  # (with a daemon for this device serving, the device works)
    warn(args, request, console)
    if ws is not None:
        console.print("[dim]models loaded (the resident daemon)[/dim]")
        return RemoteEngine(ws, args, files, reconnect)
    try:
        return RemoteEngine(await _connected(files, args, ident, console), args, files, reconnect)
    except DaemonFailed as e:
        if e.usage:
            raise UsageError(str(e)) from e
        raise


async def _reason(args: argparse.Namespace, console: Console) -> int:
    request = read_request(args, console)  # the image and the question before anything else
    try:
        engine = await _ready(args, request, console)
    except DreamrError as e:  # as a model that fails to load without the daemon
        console.print(f"[red]{escape(str(e))}[/red]")
        return EXIT_FAILED
    console.print(f"[bold]Q:[/bold] {escape(request.question)}")
    try:
        return await run(engine, request, args, console)
    except DreamrError as e:
        console.print(f"[red]{type(e).__name__}: {escape(str(e))}[/red]")
        return EXIT_FAILED
    finally:
        await engine.close()


def reason(args: argparse.Namespace, console: Console) -> int:
    """``dreamr reason`` through the daemon, with the output and exit codes of ``reason.reason_here``."""
    return asyncio.run(_reason(args, console))
