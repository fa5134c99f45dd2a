"""The wire protocol: versioned pydantic messages, their JSON Schema, and the close codes.

Why typed models and a committed schema: clients in other languages (the page's JavaScript, a
Rust or Go client) code against the schema file, and a test keeps that file equal to what the
models produce, so the protocol cannot drift silently. Every message carries ``v`` (the
protocol version); a breaking change bumps it.

Client -> server (JSON text frames):

* ``ask``: ``{"v": 1, "type": "ask", "id": "q1", "image": "<base64 or data URL>",
  "question": "...", "options": {"method": "fpsr", "tau": 1.0}}``
* ``cancel``: ``{"v": 1, "type": "cancel"}`` stops the connection's running request.

Server -> client, per request (all carry the request ``id``): ``queued`` (only when it waits),
``started``, then any of ``drafted``, ``verified``, ``rejected``, ``fallback``, ``cache_hit``;
it ends with exactly one of ``answer`` + ``stats`` (success; ``stats`` is last), ``error`` or
``cancelled``. ``hello`` is sent once, on connect.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from dreamr_stream.events import (
    CacheHitEvent,
    DraftedEvent,
    Event,
    FailedEvent,
    FallbackEvent,
    FinishedEvent,
    RejectedEvent,
    StartedEvent,
    VerifiedEvent,
)
from dreamr_stream.types import ReasoningStats, Step, Verdict

__all__ = [
    "PROTOCOL_VERSION",
    "SCHEMA_PATH",
    "AnswerMessage",
    "AskMessage",
    "CacheHitMessage",
    "CancelMessage",
    "CancelledMessage",
    "ClientMessage",
    "ClientMessageAdapter",
    "CloseCode",
    "DraftedMessage",
    "ErrorCode",
    "ErrorMessage",
    "FallbackMessage",
    "HelloMessage",
    "QueuedMessage",
    "RejectedMessage",
    "RequestOptions",
    "ServerLimits",
    "ServerMessage",
    "ServerMessageAdapter",
    "ServerStats",
    "StartedMessage",
    "StatsMessage",
    "VerifiedMessage",
    "from_event",
    "parse_client_message",
    "protocol_schema",
    "write_schema",
]

PROTOCOL_VERSION: Final = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / f"protocol-v{PROTOCOL_VERSION}.json"
Method = Literal["fpsr", "target_only", "draft_only", "sequential"]
_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
RequestId = Annotated[str, Field(min_length=1, max_length=64, pattern=f"^{_ID.pattern}$")]


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (a refused handshake is an HTTP status instead)."""

    NORMAL = 1000  # the client or the server closed normally
    GOING_AWAY = 1001  # the server is shutting down
    UNSUPPORTED_DATA = 1003  # a binary frame: the protocol is JSON text frames only
    MESSAGE_TOO_BIG = 1009  # a message over ``max_message_bytes`` (an oversize upload)
    INTERNAL_ERROR = 1011  # a bug in the server; the connection's request was cancelled
    # 1006 (no close frame) is what a client sees when the server aborts a connection that
    # stopped reading: its send did not finish within ``send_timeout_s``.


ErrorCode = Literal[
    "bad_json",  # the message is not JSON
    "bad_request",  # JSON, but not a valid message (missing or wrong fields, unknown type)
    "unsupported_version",  # ``v`` is not a version this server speaks
    "invalid_option",  # an unknown option or an option value out of range
    "invalid_image",  # not base64, not an image, too large or too small
    "invalid_question",  # empty or too long
    "request_in_progress",  # this connection already runs a request (one at a time)
    "busy",  # the server's queue is full; retry later (``retryable``)
    "model_error",  # a model call failed while serving the request
    "internal_error",  # a bug in the server
]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")
    v: Literal[1] = Field(default=PROTOCOL_VERSION, description="protocol version")


# ---------------------------------------------------------------- client -> server
class RequestOptions(BaseModel):
    """Per-request settings; anything not given uses the server's configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: Method = "fpsr"
    tau: float | None = Field(default=None, ge=0.0, description="TBVM threshold on p_pos / p_neg")
    verify: Literal["judge", "likelihood"] | None = None
    lookahead: int | None = Field(default=None, ge=1, le=16)
    fallback: Literal["on", "off", "auto"] | None = None
    max_steps: int | None = Field(default=None, ge=1, description="at most the server's max_steps")
    cache: bool | None = Field(default=None, description="use the trajectory cache")
    drafts: bool = Field(default=True, description="send drafted events (unverified proposals)")
    timeline: bool = Field(default=False, description="include the lane timeline in stats")


class AskMessage(_Message):
    type: Literal["ask"] = "ask"
    id: RequestId | None = Field(default=None, description="echoed on every event; the server picks one if absent")
    image: str = Field(min_length=1, description="the image as base64 or a data: URL; never a path")
    question: str
    options: RequestOptions = RequestOptions()


class CancelMessage(_Message):
    type: Literal["cancel"] = "cancel"


ClientMessage = Annotated[Union[AskMessage, CancelMessage], Field(discriminator="type")]
ClientMessageAdapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


# ---------------------------------------------------------------- server -> client
class ServerLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_message_bytes: int
    max_image_bytes: int
    max_question_chars: int
    max_steps: int


class HelloMessage(_Message):
    type: Literal["hello"] = "hello"
    server: str = "dreamr-websocket"
    version: str
    methods: list[str]
    limits: ServerLimits


class _RequestMessage(_Message):
    id: str


class QueuedMessage(_RequestMessage):
    type: Literal["queued"] = "queued"
    position: int = Field(ge=1, description="requests waiting, this one included")


class StartedMessage(_RequestMessage):
    type: Literal["started"] = "started"
    question: str
    method: str


class DraftedMessage(_RequestMessage):
    """The draft proposed step ``index``; not yet verified."""

    type: Literal["drafted"] = "drafted"
    index: int
    text: str
    elapsed_s: float


class VerifiedMessage(_RequestMessage):
    """TBVM accepted a drafted (or cached) step; ``step.verdict`` holds its ratio."""

    type: Literal["verified"] = "verified"
    step: Step
    elapsed_s: float


class RejectedMessage(_RequestMessage):
    type: Literal["rejected"] = "rejected"
    index: int
    text: str
    verdict: Verdict
    elapsed_s: float


class FallbackMessage(_RequestMessage):
    """The target wrote step ``step.index`` itself."""

    type: Literal["fallback"] = "fallback"
    step: Step
    elapsed_s: float


class CacheHitMessage(_RequestMessage):
    type: Literal["cache_hit"] = "cache_hit"
    steps: int
    elapsed_s: float


class AnswerMessage(_RequestMessage):
    type: Literal["answer"] = "answer"
    answer: str | None = Field(description="the text after 'Answer:' in the final step, if any")
    steps: list[Step]
    elapsed_s: float


class StatsMessage(_RequestMessage):
    """The last message of a successful request."""

    type: Literal["stats"] = "stats"
    stats: ReasoningStats
    acceptance_rate: float | None
    queue_wait_s: float


class ErrorMessage(_Message):
    type: Literal["error"] = "error"
    id: str | None = Field(default=None, description="the request's id; None for a message that never became one")
    code: ErrorCode
    message: str
    retryable: bool = False


class CancelledMessage(_RequestMessage):
    type: Literal["cancelled"] = "cancelled"


ServerMessage = Annotated[
    Union[
        HelloMessage,
        QueuedMessage,
        StartedMessage,
        DraftedMessage,
        VerifiedMessage,
        RejectedMessage,
        FallbackMessage,
        CacheHitMessage,
        AnswerMessage,
        StatsMessage,
        ErrorMessage,
        CancelledMessage,
    ],
    Field(discriminator="type"),
]
ServerMessageAdapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


class ServerStats(BaseModel):
    """``GET /stats``: what the server is doing now, and totals since it started."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    v: Literal[1] = PROTOCOL_VERSION
    uptime_s: float
    connections: int
    active_requests: int = Field(description="requests holding a slot (running in the engine)")
    queued: int = Field(description="requests waiting for a slot")
    engine_requests: int = Field(description="the Reasoner's own count of running requests")
    in_flight: int = Field(description="model calls running in worker threads now")
    max_active: int
    max_waiting: int
    totals: dict[str, int]


_ERROR_CODES: dict[str, ErrorCode] = {
    "InvalidImageError": "invalid_image",
    "InvalidQuestionError": "invalid_question",
    "InputError": "bad_request",
    "ConfigError": "invalid_option",
}


def from_event(
    event: Event, request_id: str, *, timeline: bool = False, queue_wait_s: float = 0.0
) -> list[ServerMessage]:
    """The wire messages for one engine event (a finished request becomes ``answer`` + ``stats``)."""
    rid, t = request_id, event.elapsed_s
    if isinstance(event, StartedEvent):
        return [StartedMessage(id=rid, question=event.question, method=event.method)]
    if isinstance(event, DraftedEvent):
        return [DraftedMessage(id=rid, index=event.index, text=event.text, elapsed_s=t)]
    if isinstance(event, VerifiedEvent):
        return [VerifiedMessage(id=rid, step=event.step, elapsed_s=t)]
    if isinstance(event, RejectedEvent):
        return [RejectedMessage(id=rid, index=event.index, text=event.text, verdict=event.verdict, elapsed_s=t)]
    if isinstance(event, FallbackEvent):
        return [FallbackMessage(id=rid, step=event.step, elapsed_s=t)]
    if isinstance(event, CacheHitEvent):
        return [CacheHitMessage(id=rid, steps=event.steps, elapsed_s=t)]
    if isinstance(event, FinishedEvent):
        r = event.result
        stats = r.stats if timeline else r.stats.model_copy(update={"timeline": []})
        return [
            AnswerMessage(id=rid, answer=r.answer, steps=r.steps, elapsed_s=t),
            StatsMessage(id=rid, stats=stats, acceptance_rate=stats.acceptance_rate, queue_wait_s=queue_wait_s),
        ]
    if isinstance(event, FailedEvent):
        code = _ERROR_CODES.get(event.error, "model_error")
        return [ErrorMessage(id=rid, code=code, message=f"{event.error}: {event.message}")]
    raise TypeError(f"unknown engine event {type(event).__name__}")  # pragma: no cover - new core event


def parse_client_message(raw: str) -> ClientMessage | ErrorMessage:
    """A validated client message, or the error to send back (never an exception).

    Error messages name the offending fields but never echo input values (an image can be
    megabytes, and echoing input back is how reflection bugs start).
    """
    try:
        data = json.loads(raw)
    except ValueError as e:
        return ErrorMessage(code="bad_json", message=f"the message is not JSON: {e}")
    if not isinstance(data, dict):
        return ErrorMessage(code="bad_request", message="a message is a JSON object with 'v' and 'type'")
    given_id = data.get("id")
    rid = given_id if isinstance(given_id, str) and _ID.fullmatch(given_id) else None
    if data.get("v") != PROTOCOL_VERSION:
        return ErrorMessage(
            id=rid, code="unsupported_version", message=f"this server speaks protocol v{PROTOCOL_VERSION}; send 'v': 1"
        )
    try:
        return ClientMessageAdapter.validate_python(data)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        in_options = any(len(err["loc"]) > 1 and err["loc"][1] == "options" for err in errors)
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'type'}: {err['msg']}" for err in errors[:4])
        return ErrorMessage(id=rid, code="invalid_option" if in_options else "bad_request", message=detail)


def protocol_schema() -> dict[str, Any]:
    """The JSON Schema of both directions and of ``/stats`` (what ``schema/protocol-v1.json`` holds)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"dreamr-websocket protocol v{PROTOCOL_VERSION}",
        "version": PROTOCOL_VERSION,
        "close_codes": {c.name.lower(): int(c) for c in CloseCode},
        "client": ClientMessageAdapter.json_schema(mode="validation"),
        "server": ServerMessageAdapter.json_schema(mode="serialization"),
        "stats": ServerStats.model_json_schema(mode="serialization"),
    }


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Regenerate the committed schema file (run after changing a message model)."""
    path.write_text(json.dumps(protocol_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":  # python -m dreamr_websocket.protocol
    print(write_schema())
