"""``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI API, as two Starlette endpoints.

They see the server through ``ApiHost`` (the few things they use of it), as a WebSocket
session sees it through ``SessionHost``: the app mounts them (``api_routes``) after its own
gates (token, Origin, Host, connection limits), and this module never imports the app.

A request goes through the same steps as one on ``/ws``, in the same order: its body is read
up to ``max_message_bytes`` (413 beyond, without reading the rest) and parsed (in a worker
thread when large); its address's rate is counted (429); the model (one per served task: it
picks the task's Reasoner), the options, the question and the image are checked (400 / 404)
before it takes a place in the admission queue (429 when full, whatever the task: one queue).
Then it runs in the engine, its events turned into chunks by ``openai_protocol.ChunkWriter``.

Why the request runs inside its response (``ChatRun``, an ASGI response of its own) rather
than in Starlette's ``StreamingResponse`` over a generator:

* a client that leaves must cancel its request at once, even while a model call runs and
  nothing is being sent. Starlette 1.10's ``StreamingResponse`` listens for
  ``http.disconnect`` only on servers that report ASGI spec < 2.4 (uvicorn 0.55 reports 2.3,
  and there it does cancel the generator); from 2.4 it relies on a failed send, which comes
  only with the next chunk. And when its cancellation lands in a send rather than in the
  generator, the generator is closed later, by the event loop's finalizer for abandoned async
  generators, not before the response returns. Here a listener always runs beside the
  request, and the engine's stream is held in ``contextlib.aclosing`` in the same task, so it
  is closed (every lane cancelled and awaited) before the response returns;
* a client that stops reading blocks a send for as long as it stays connected (uvicorn waits
  for its write buffer to drain; ``StreamingResponse`` has no bound), holding an engine slot:
  every send here is bounded by ``send_timeout_s``;
* the slot is held from the queue to the last byte, in the task that sends, so a request
  refused as busy, or one that fails before its first event, still gets its HTTP status (a
  stream's ``200`` goes out with its first chunk, or, when it has to wait, with a ``queued``
  notice).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from PIL import Image
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from dreamr_stream.config import ReasonerConfig
from dreamr_stream.errors import DreamrError
from dreamr_stream.inputs import check_question
from dreamr_websocket.admission import Admission, Busy, RateLimited, RequestRate
from dreamr_websocket.connection import ClientGone, client_address
from dreamr_websocket.openai_chunks import Chunk, ChunkWriter, count_tokens
from dreamr_websocket.openai_protocol import (
    ChatRequest,
    OpenAIErrorResponse,
    api_error,
    error_for,
    model_list,
    parse_chat_request,
)
from dreamr_websocket.protocol import QueuedMessage
from dreamr_websocket.served import ServedTasks
from dreamr_websocket.session import decode_image, held_bytes, request_config
from dreamr_websocket.settings import ServerSettings

if TYPE_CHECKING:
    from dreamr_stream.reasoner import Reasoner

__all__ = [
    "BUSY_RETRY_AFTER_S",
    "ApiHost",
    "ChatRun",
    "api_routes",
    "chat_completions",
    "error_response",
    "list_models",
    "read_body",
]

log = logging.getLogger(__name__)
BUSY_RETRY_AFTER_S = 1.0  # what a busy answer's Retry-After says: the queue moves in about a request's time
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # a buffering proxy in front (nginx) would hold the steps back
]


class ApiHost(Protocol):
    """What the endpoints use of the server they are mounted on."""

    tasks: ServedTasks  # each task's Reasoner and model id, shared by every route; the first is the default
    settings: ServerSettings
    admission: Admission  # the one queue for /ws and /v1
    rate: RequestRate | None  # requests a minute per client address; None: no limit
    totals: Counter[str]  # the server's counters, as /stats shows them
    decode_limiter: anyio.CapacityLimiter | None  # parsing and image decoding threads

    @property
    def closing(self) -> bool:
        """True while the server shuts down: new requests get 503."""
        ...


def error_response(error: OpenAIErrorResponse) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def api_routes(host: ApiHost) -> list[Route]:
    """The two routes, bound to ``host``, for the app's route table."""

    async def models(request: Request) -> Response:
        return await list_models(request, host)

    async def chat(request: Request) -> Response:
        return await chat_completions(request, host)

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]


async def list_models(request: Request, host: ApiHost) -> Response:
    """``GET /v1/models``: OpenAI's list object of the served model names."""
    return JSONResponse(model_list(host.tasks.model_ids, created=int(time.time())))


async def read_body(request: Request, limit: int) -> bytes | OpenAIErrorResponse:
    """The body, or 413 as soon as it is known to be over ``limit`` bytes (the rest is never read)."""
    too_large = api_error(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body is over the limit of {limit} bytes (the image included)"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class _Prepared:
    """A request checked and decoded, ready to wait for a slot."""

    id: str
    model: str
    reasoner: Reasoner  # the model's task's
    image: Image.Image
    question: str
    config: ReasonerConfig
    request: ChatRequest  # what was asked (its image text dropped: the decoded image is above)


async def chat_completions(request: Request, host: ApiHost) -> Response:
    """``POST /v1/chat/completions``: stream (SSE) or one JSON object; errors in OpenAI's shape."""
    if host.closing:
        return error_response(api_error(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down; retry later"))
    try:
        body = await read_body(request, host.settings.max_message_bytes)
    except ClientDisconnect:
        return Response(status_code=HTTPStatus.BAD_REQUEST)  # no one is left to read it
    parsed = await _parse(body, host) if isinstance(body, bytes) else body
    del body  # an upload can be megabytes: keep only what was parsed from it
    if isinstance(parsed, OpenAIErrorResponse):
        host.totals["bad_messages"] += 1
        return error_response(parsed)
    if (limited := _rate_limited(request, host)) is not None:
        return error_response(limited)
    host.totals["requests"] += 1
    try:
        prepared = await _prepare(parsed, host)
    except DreamrError as e:
        host.totals["rejected_input"] += 1
        return error_response(error_for(e))
    except Exception:
        log.exception("a chat completion failed inside the server")
        host.totals["internal_errors"] += 1
        return error_response(api_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error"))
    if isinstance(prepared, OpenAIErrorResponse):
        host.totals["rejected_input"] += 1
        return error_response(prepared)
    return ChatRun(host, prepared)


async def _parse(body: bytes, host: ApiHost) -> ChatRequest | OpenAIErrorResponse:
    """``body`` parsed: inline when small, in a worker thread when large (an upload)."""
    if len(body) <= host.settings.parse_in_thread_bytes:
        return parse_chat_request(body)
    return await anyio.to_thread.run_sync(parse_chat_request, body, limiter=host.decode_limiter)


def _rate_limited(request: Request, host: ApiHost) -> OpenAIErrorResponse | None:
    """Count a request against its client's rate; the 429 when over it."""
    address = client_address(request)
    if host.rate is None or address is None:  # no client address: a unix socket, only its owner
        return None
    try:
        host.rate.take(address)
    except RateLimited as e:
        host.totals["rate_limited"] += 1
        return api_error(HTTPStatus.TOO_MANY_REQUESTS, str(e), retry_after_s=e.retry_after_s)
    return None


async def _prepare(parsed: ChatRequest, host: ApiHost) -> _Prepared | OpenAIErrorResponse:
    """Check what the request asks for, cheapest first; the image is decoded last, in a thread."""
    served = host.tasks.by_model(parsed.model)  # no model named: the default task's
    if served is None:
        message = f"this model does not exist here; the server serves: {', '.join(host.tasks.model_ids)}"
        return api_error(HTTPStatus.NOT_FOUND, message, param="model")
    served.requests += 1
    base = served.reasoner.config
    config = request_config(base, parsed.options)
    question = check_question(parsed.question, base.limits)
    limiter = host.decode_limiter
    image = await anyio.to_thread.run_sync(decode_image, parsed.image, base.limits, limiter=limiter)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    request = parsed.model_copy(update={"image": ""})
    return _Prepared(rid, served.model, served.reasoner, image, question, config, request)


class _Sender:
    """One response's sends: each bounded in time; SSE events or one JSON body."""

    def __init__(self, send: Send, timeout_s: float, on_abort: Callable[[], None]) -> None:
        self._send_raw = send
        self.timeout_s = timeout_s
        self.on_abort = on_abort
        self.started = False  # the status line and headers are out
        self.streaming = False  # ... of an event stream

    async def _send(self, message: Message) -> None:
        try:
            with anyio.fail_after(self.timeout_s):
                await self._send_raw(message)
        except TimeoutError:
            self.on_abort()
            raise ClientGone(f"a send took over {self.timeout_s:g} s: the client stopped reading") from None
        except OSError as e:  # servers on ASGI spec 2.4 report a closed connection here
            raise ClientGone(str(e)) from e

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def events(self, chunks: list[Chunk]) -> None:
        """Chunks as SSE events (``data: {json}``); the first call starts the 200 stream."""
        if not chunks:
            return
        if not self.started:
            self.streaming = True
            await self._start(HTTPStatus.OK, _SSE_HEADERS)
        body = "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks).encode()
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def done(self) -> None:
        """``data: [DONE]``: the stream's end."""
        await self._send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def json(
        self, payload: dict[str, Any], status: int = HTTPStatus.OK, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await self._start(status, raw)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def error(self, error: OpenAIErrorResponse) -> None:
        """The error as its HTTP status, or, once a stream has started, as its last event."""
        if self.streaming:
            await self.events([error.body()])
            await self.done()
        elif not self.started:
            await self.json(error.body(), error.status, error.headers())


class ChatRun(Response):
    """One chat completion, run while its response is sent (see the module's docstring).

    A client's disconnect cancels the request; a send that takes over ``send_timeout_s``
    gives it up (the client stopped reading). Either way the engine's stream is closed and the
    slot freed before ``__call__`` returns.
    """

    def __init__(self, host: ApiHost, prepared: _Prepared) -> None:
        super().__init__()
        self.host = host
        self.prepared = prepared
        self.totals = host.totals
        request = prepared.request
        self.writer = ChunkWriter(
            request_id=prepared.id,
            model=prepared.model,
            created=int(time.time()),
            prompt_tokens=count_tokens(prepared.question),
            max_tokens=request.max_tokens,
            include_usage=request.include_usage,
            drafts=request.options.drafts,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = _Sender(send, self.host.settings.send_timeout_s, self._on_abort)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, receive, tg.cancel_scope)
            try:
                await self._run(out)
            finally:
                tg.cancel_scope.cancel()

    def _on_abort(self) -> None:
        self.totals["slow_client_aborts"] += 1

    @staticmethod
    async def _watch(receive: Receive, scope: anyio.CancelScope) -> None:
        """Cancel the request when the client disconnects (the body has been read already)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _run(self, out: _Sender) -> None:
        p = self.prepared
        try:
            try:
                on_wait = self._on_wait(out) if p.request.stream else None
                async with self.host.admission.slot(on_wait, image_bytes=held_bytes(p.image)) as waited_s:
                    self.writer.queue_wait_s = waited_s
                    await self._serve(out)
            except Busy as e:
                self.totals["busy"] += 1
                busy = api_error(
                    HTTPStatus.TOO_MANY_REQUESTS, str(e), code="server_busy", retry_after_s=BUSY_RETRY_AFTER_S
                )
                await out.error(busy)
        except ClientGone:
            self.totals["client_gone"] += 1
        except anyio.get_cancelled_exc_class():
            self.totals["cancelled"] += 1  # the client left, or the server is stopping
            raise
        except Exception:
            log.exception("chat completion %s failed inside the server", p.id)
            self.totals["internal_errors"] += 1
            with suppress(ClientGone):
                await out.error(api_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error"))

    def _on_wait(self, out: _Sender) -> Callable[[int], Awaitable[None]]:
        """A stream that must wait for a slot starts at once, its first chunk saying so."""

        async def on_wait(position: int) -> None:
            queued = QueuedMessage(id=self.prepared.id, position=position).model_dump(mode="json")
            await out.events(self.writer.start(dreamr=queued))

        return on_wait

    async def _serve(self, out: _Sender) -> None:
        p, writer = self.prepared, self.writer
        stream = p.reasoner.astream_events(p.image, p.question, method=p.request.options.method, config=p.config)
        try:
            async with aclosing(stream) as events:  # closed on any exit: the request stops with it
                async for event in events:
                    chunks = writer.feed(event)
                    if writer.done:
                        self.totals["failed" if writer.error is not None else "completed"] += 1
                    if p.request.stream:
                        await out.events(chunks)
                    if writer.done:
                        break  # finished, failed, or max_tokens reached: closing the stream stops the request
        except DreamrError as e:  # raised before the first event (e.g. a method that needs a draft)
            self.totals["failed"] += 1
            await out.error(error_for(e))
            return
        if not writer.done:
            raise RuntimeError("the engine's stream ended without a result")
        if p.request.stream:
            await out.done()
        elif writer.error is not None:
            await out.error(writer.error)
        else:
            await out.json(writer.completion())
