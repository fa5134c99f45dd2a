"""One WebSocket connection: read messages, run at most one request, stream its events back.

Why it is shaped like this:

* The reader loop keeps reading while a request streams, so a client that leaves is noticed
  at once (not at the next send, which may be seconds away inside a model call), and its
  request is cancelled: the engine's stream is held in ``contextlib.aclosing``, so cancelling
  the request task closes the generator, which cancels and awaits every lane.
* Every send is bounded by ``send_timeout_s``. A client that stops reading fills the TCP and
  write buffers and would block ``send`` forever (pings do not help: they queue behind the
  data); on timeout the transport is aborted, which ends the reader loop and so the request.
* Input is checked before the request takes a slot in the admission queue: a bad image never
  waits in line or holds a slot. Images arrive only as base64; a string is never a path.
* What one client may take is bounded: its requests a minute (per address, counted before any
  decoding), and its time connected without asking (``idle_timeout_s``: a connection that holds
  a place and asks nothing is closed, however well it answers pings). A large message is parsed
  in a worker thread: parsing megabytes of JSON on the event loop would stall every connection.
* A session sees its server through ``SessionHost``, the few things it uses of it, and its
  client through ``Connection`` (``connection.py``): the server imports this module to run its
  connections, and this module never imports the server or the ASGI framework.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import anyio
from PIL import Image

from dreamr_stream.config import InputLimits, ReasonerConfig
from dreamr_stream.errors import ConfigError, DreamrError, InputError, InvalidImageError, InvalidQuestionError
from dreamr_stream.events import DraftedEvent, Event, FailedEvent, FinishedEvent
from dreamr_stream.inputs import check_question, load_image
from dreamr_websocket.admission import Admission, Busy, RateLimited, RequestRate
from dreamr_websocket.connection import ClientGone, Connection
from dreamr_websocket.protocol import (
    AskMessage,
    CancelledMessage,
    CancelMessage,
    ClientMessage,
    CloseCode,
    ErrorCode,
    ErrorMessage,
    HelloMessage,
    QueuedMessage,
    RequestOptions,
    ServerMessage,
    from_event,
    parse_client_message,
)
from dreamr_websocket.served import ServedTasks
from dreamr_websocket.settings import ServerSettings

if TYPE_CHECKING:
    from dreamr_stream.reasoner import Reasoner

__all__ = [
    "ClientGone",
    "Outbox",
    "Session",
    "SessionHost",
    "decode_image",
    "held_bytes",
    "request_config",
]

log = logging.getLogger(__name__)
_request_ids = itertools.count(1)


class SessionHost(Protocol):
    """What a session uses of the server it belongs to (``DreamrServer`` is one)."""

    tasks: ServedTasks  # each task's Reasoner, shared by every connection; a request names one or gets the default
    settings: ServerSettings
    admission: Admission  # the bounded queue every request waits in for a slot
    rate: RequestRate | None  # requests a minute per client address; None: no limit
    totals: Counter[str]  # the server's counters, which each session adds to
    decode_limiter: anyio.CapacityLimiter | None  # image decoding threads; None before the server starts

    def hello(self) -> HelloMessage:
        """The first message of every connection."""
        ...


class Outbox:
    """Serialised sends to one client, each bounded in time."""

    def __init__(self, ws: Connection, timeout_s: float, on_abort: Callable[[], None]) -> None:
        self.ws = ws
        self.timeout_s = timeout_s
        self.on_abort = on_abort
        self._lock = asyncio.Lock()

    async def send(self, message: ServerMessage) -> None:
        data = message.model_dump_json()
        try:
            async with asyncio.timeout(self.timeout_s), self._lock:
                await self.ws.send(data)
        except TimeoutError:
            log.warning("client %s stopped reading for %.1fs: aborting", self.ws.address, self.timeout_s)
            self.on_abort()
            self.ws.abort()
            raise ClientGone("send timed out") from None


def decode_image(text: str, limits: InputLimits) -> Image.Image:
    """base64 (or a base64 data URL) -> a validated RGB image. Runs in a worker thread."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidImageError("data URLs must be base64 (data:image/png;base64,...)")
    if len(text) > (limits.max_image_bytes + 2) // 3 * 4:  # reject before decoding
        raise InvalidImageError(f"the image is over the limit of {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError("the image is not valid base64 (images are sent as base64, never as paths)") from e
    return load_image(data, limits)


def held_bytes(image: Image.Image) -> int:
    """The memory a decoded image holds: Pillow keeps an RGB pixel in 4 bytes."""
    return image.width * image.height * 4


def request_config(base: ReasonerConfig, options: RequestOptions) -> ReasonerConfig:
    """The server's config with the client's options applied; clients may only lower max_steps."""
    if options.max_steps is not None and options.max_steps > base.generation.max_steps:
        raise ConfigError(f"options.max_steps: at most {base.generation.max_steps} on this server")
    return base.override(
        tau=options.tau,
        mode=options.verify,
        max_steps=options.max_steps,
        lookahead=options.lookahead,
        fallback=options.fallback,
        cache=options.cache,
    )


def _error_code(e: DreamrError) -> ErrorCode:
    if isinstance(e, InvalidImageError):
        return "invalid_image"
    if isinstance(e, InvalidQuestionError):
        return "invalid_question"
    if isinstance(e, ConfigError):
        return "invalid_option"
    if isinstance(e, InputError):
        return "bad_request"
    return "model_error"


@dataclass
class _Prepared:
    id: str
    reasoner: Reasoner  # the requested task's
    image: Image.Image
    question: str
    config: ReasonerConfig
    options: RequestOptions


class Session:
    def __init__(self, ws: Connection, server: SessionHost) -> None:
        self.ws = ws
        self.server = server
        self.totals = server.totals
        self.outbox = Outbox(ws, server.settings.send_timeout_s, self._on_abort)
        self._task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._task_id: str | None = None
        self._ended = False  # the running request sent its last message (it may still be closing)
        self._idle_since = asyncio.get_running_loop().time()  # connected, or its last request ended

    def _on_abort(self) -> None:
        self.totals["slow_client_aborts"] += 1

    async def run(self) -> None:
        """Serve the connection until the client leaves; its running request never outlives it."""
        self.totals["connections"] += 1
        try:
            await self.outbox.send(self.server.hello())
            while (raw := await self._next_message()) is not None:
                if isinstance(raw, bytes):
                    self.totals["bad_messages"] += 1
                    await self.ws.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported: send JSON text")
                    break
                await self.on_message(raw)
                del raw  # an upload can be megabytes: do not hold it while waiting for the next message
            else:
                self.totals["idle_timeouts"] += 1
                await self.ws.close(CloseCode.NORMAL, f"idle: no request for {self.server.settings.idle_timeout_s:g} s")
        except ClientGone:
            pass
        finally:
            await self._stop_request()

    async def _next_message(self) -> str | bytes | None:
        """The client's next message; None once the connection has been idle for ``idle_timeout_s``.

        Idle means no request running: the clock starts at connect and again when a request
        ends, and only a request stops it (pings, cancels and bad messages do not).
        """
        timeout_s = self.server.settings.idle_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            if timeout_s is None:
                return await self.ws.recv()
            running = self._task is not None and not self._task.done()
            wait_s = timeout_s if running else self._idle_since + timeout_s - loop.time()
            if wait_s <= 0:
                return None
            try:
                async with asyncio.timeout(wait_s):  # a cancelled recv loses nothing: the next one reads it
                    return await self.ws.recv()
            except TimeoutError:
                continue  # look again: a request may have started or ended meanwhile

    async def _parse(self, raw: str) -> ClientMessage | ErrorMessage:
        """``raw`` parsed: inline when small, in a worker thread when large (an upload)."""
        if len(raw) <= self.server.settings.parse_in_thread_bytes:
            return parse_client_message(raw)
        return await anyio.to_thread.run_sync(parse_client_message, raw, limiter=self.server.decode_limiter)

    async def _rate_limited(self, ask: AskMessage) -> bool:
        """Count an ask against its client's rate; True (and the client told) when over it."""
        address = self.ws.address
        if self.server.rate is None or address is None:
            return False
        try:
            self.server.rate.take(address)
        except RateLimited as e:
            self.totals["rate_limited"] += 1
            await self.outbox.send(ErrorMessage(id=ask.id, code="rate_limited", message=str(e), retryable=True))
            return True
        return False

    async def on_message(self, raw: str) -> None:
        """Act on one client message: a request, a cancel, or a bad message answered with an error."""
        message = await self._parse(raw)
        if isinstance(message, ErrorMessage):
            self.totals["bad_messages"] += 1
            await self.outbox.send(message)
        elif isinstance(message, CancelMessage):
            # a request that sent its last message is over for the client, even while it closes
            running, rid = self._task is not None and not self._task.done() and not self._ended, self._task_id
            await self._stop_request()
            if running and rid is not None:
                await self.outbox.send(CancelledMessage(id=rid))
        elif self._task is not None and not self._task.done() and not self._ended:
            await self.outbox.send(
                ErrorMessage(
                    id=message.id,
                    code="request_in_progress",
                    message=f"request {self._task_id} is still running: one request at a time per connection "
                    "(wait for its stats or error, or send cancel)",
                )
            )
        elif not await self._rate_limited(message):
            if self._task is not None:  # ended for the client, maybe still closing its stream: a moment
                await asyncio.wait([self._task])
            self._task_id = message.id or f"r{next(_request_ids)}"
            self._ended = False
            self._scope = anyio.CancelScope()
            self._task = asyncio.get_running_loop().create_task(self._serve(message, self._task_id, self._scope))
            self._task.add_done_callback(self._request_done)

    def _request_done(self, _task: asyncio.Task[None]) -> None:
        self._idle_since = asyncio.get_running_loop().time()

    async def _stop_request(self) -> None:
        """Cancel the running request and wait until its stream is closed (no model work left).

        Through an anyio cancel scope, not ``task.cancel()``: a native cancel goes through the
        core's shielded clean-up, and one that lands while the stream is already closing (the
        client vanished mid-send) would cut that clean-up short.
        """
        task, scope, self._task, self._scope = self._task, self._scope, None, None
        if task is not None and scope is not None and not task.done():
            scope.cancel()
            await asyncio.wait([task])

    async def _serve(self, ask: AskMessage, rid: str, scope: anyio.CancelScope) -> None:
        with scope:
            self.totals["requests"] += 1
            try:
                try:
                    prepared = await self._prepare(ask, rid)
                except DreamrError as e:
                    self.totals["rejected_input"] += 1
                    await self._send_last(ErrorMessage(id=rid, code=_error_code(e), message=str(e)))
                    return
                del ask  # the upload can be megabytes; the decoded image is all we keep

                async def on_wait(position: int) -> None:
                    await self.outbox.send(QueuedMessage(id=rid, position=position))

                try:
                    async with self.server.admission.slot(on_wait, image_bytes=held_bytes(prepared.image)) as waited_s:
                        await self._stream(prepared, waited_s)
                except Busy as e:
                    self.totals["busy"] += 1
                    await self._send_last(ErrorMessage(id=rid, code="busy", message=str(e), retryable=True))
            except ClientGone:
                self.totals["client_gone"] += 1
            except asyncio.CancelledError:
                self.totals["cancelled"] += 1
                raise
            except Exception:
                log.exception("request %s failed inside the server", rid)
                self.totals["internal_errors"] += 1
                try:
                    await self._send_last(ErrorMessage(id=rid, code="internal_error", message="internal server error"))
                except ClientGone:
                    pass

    async def _prepare(self, ask: AskMessage, rid: str) -> _Prepared:
        # the task first: its Reasoner's config is what the options, question and image are checked against
        served = self.server.tasks.task(ask.task)  # a task not served: ConfigError, refused as a bad option is
        served.requests += 1
        base = served.reasoner.config
        config = request_config(base, ask.options)
        question = check_question(ask.question, base.limits)
        image = await anyio.to_thread.run_sync(decode_image, ask.image, base.limits, limiter=self.server.decode_limiter)
        return _Prepared(rid, served.reasoner, image, question, config, ask.options)

    async def _stream(self, p: _Prepared, waited_s: float) -> None:
        reasoner = p.reasoner
        try:
            stream = reasoner.astream_events(p.image, p.question, method=p.options.method, config=p.config)
            # an async generator, though typed as an iterator by the core: close it on any exit
            async with aclosing(cast(AsyncGenerator[Event, None], stream)) as events:
                async for event in events:
                    if isinstance(event, DraftedEvent) and not p.options.drafts:
                        continue
                    if isinstance(event, FinishedEvent):
                        self.totals["completed"] += 1
                    elif isinstance(event, FailedEvent):
                        self.totals["failed"] += 1
                    for message in from_event(event, p.id, timeline=p.options.timeline, queue_wait_s=waited_s):
                        if message.type in ("stats", "error"):
                            await self._send_last(message)
                        else:
                            await self.outbox.send(message)
        except DreamrError as e:  # raised before the first event (e.g. a method that needs a draft)
            self.totals["failed"] += 1
            await self._send_last(ErrorMessage(id=p.id, code=_error_code(e), message=str(e)))

    async def _send_last(self, message: ServerMessage) -> None:
        """A request's terminal message: from now on the client may send its next request."""
        await self.outbox.send(message)
        self._ended = True
