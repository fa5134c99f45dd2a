"""The wire protocol: versioned pydantic messages, their JSON Schema, and the close codes.

Why typed models and a committed schema: clients in other languages (the page's JavaScript, a
Rust or Go client) code against the schema file, and a test keeps that file equal to what the
models produce, so the protocol cannot drift silently. Every message carries ``v`` (the
protocol version); a breaking change bumps it.

Client -> server (JSON text frames):

* ``ask``: ``{"v": 1, "type": "ask", "id": "q1", "image": "<base64 or data URL>",
  "question": "...", "task": "charts", "options": {"method": "fpsr", "tau": 1.0}}``; ``task``
  (optional, added in place: v1 clients that never send it get the server's default task) picks
  one of the tasks the server serves (``GET /tasks``)
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
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from dreamr_stream.events import Event, EventBase, FailedEvent, FinishedEvent
from dreamr_stream.types import ReasoningStats, SpeculationPlan, Step

__all__ = [
    "EVENT_MESSAGES",
    "NAME_PATTERN",
    "PROTOCOL_VERSION",
    "SCHEMA_PATH",
    "TAU_MAX",
    "AnswerMessage",
    "AskMessage",
    "CancelMessage",
    "CancelledMessage",
    "ClientMessage",
    "ClientMessageAdapter",
    "CloseCode",
    "ErrorCode",
    "ErrorMessage",
    "HelloMessage",
    "QueuedMessage",
    "RequestOptions",
    "ServerLimits",
    "ServerMessage",
    "ServerMessageAdapter",
    "ServerStats",
    "StatsMessage",
    "TaskStats",
    "from_event",
    "parse_client_message",
    "protocol_schema",
    "write_schema",
]

PROTOCOL_VERSION: Final = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / f"protocol-v{PROTOCOL_VERSION}.json"
Method = Literal["fpsr", "target_only", "draft_only", "sequential"]
# what a request id and a task's name may be: plain, bounded text
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
RequestId = Annotated[str, Field(min_length=1, max_length=64, pattern=f"^{NAME_PATTERN.pattern}$")]
TaskName = Annotated[str, Field(min_length=1, max_length=64, pattern=f"^{NAME_PATTERN.pattern}$")]
# A client's tau is finite and bounded: Python's JSON reads ``Infinity``, ``NaN`` and ``1e999``
# (inf) as numbers, and a server should not run on values its operator never chose. A ratio of
# 1e6 already rejects almost every step; a client that wants the target alone asks for
# ``method: target_only``. (The library's own ``tau=inf``, reject-all, is unchanged.)
TAU_MAX: Final = 1e6


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
    "invalid_option",  # an unknown option, an option value out of range, or a task this server does not serve
    "invalid_image",  # not base64, not an image, too large or too small
    "invalid_question",  # empty or too long
    "request_in_progress",  # this connection already runs a request (one at a time)
    "busy",  # the server's queue, or its budget for held images, is full; retry later (``retryable``)
    "rate_limited",  # this address asked too often; the message says when to retry (``retryable``)
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
    tau: float | None = Field(
        default=None,
        ge=0.0,
        le=TAU_MAX,
        allow_inf_nan=False,
        description=f"TBVM threshold on p_pos / p_neg, a finite number from 0 to {TAU_MAX:g}",
    )
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
    task: TaskName | None = Field(
        default=None, description="which served task answers (GET /tasks lists them); absent: the server's default"
    )
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
    type: str  # a Literal in every message


class QueuedMessage(_RequestMessage):
    type: Literal["queued"] = "queued"
    position: int = Field(ge=1, description="requests waiting, this one included")


def _wire(event: type[EventBase]) -> type[_RequestMessage]:
    """The message of a core event: its fields, plus the protocol version and the request id.

    Every event a request streams is derived here, so a new core event reaches the wire (and
    the schema) with no change to this module; only ``finished`` and ``failed`` have messages
    of their own (``answer`` + ``stats``, ``error``).
    """
    name = event.__name__.removesuffix("Event") + "Message"
    bases: Any = (event, _RequestMessage)  # the event first: its Literal ``type`` wins over the base's str
    return create_model(name, __base__=bases, __module__=__name__, __doc__=event.__doc__)  # type: ignore[no-any-return]


# the events a request streams, each sent as it is (plus ``v`` and ``id``)
STREAMED: Final = tuple(e for e in get_args(get_args(Event)[0]) if e not in (FinishedEvent, FailedEvent))
EVENT_MESSAGES: Final[dict[type[EventBase], type[_RequestMessage]]] = {e: _wire(e) for e in STREAMED}


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


_SERVER_MESSAGES: tuple[type[_Message], ...] = (HelloMessage, QueuedMessage, *EVENT_MESSAGES.values())
_SERVER_MESSAGES += (AnswerMessage, StatsMessage, ErrorMessage, CancelledMessage)
if TYPE_CHECKING:  # a type checker sees the derived messages as what they share
    ServerMessage = (
        HelloMessage | QueuedMessage | _RequestMessage | AnswerMessage | StatsMessage | ErrorMessage | CancelledMessage
    )
else:
    ServerMessage = Annotated[Union[_SERVER_MESSAGES], Field(discriminator="type")]
ServerMessageAdapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)  # type: ignore[arg-type]


class TaskStats(BaseModel):
    """One served task in ``GET /stats``: its model id, and what its Reasoner is doing now."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str = Field(description="the task's OpenAI model id")
    requests: int = Field(description="requests routed to this task since the server started (WebSocket and API)")
    engine_requests: int = Field(description="the task's Reasoner's own count of running requests")
    in_flight: int = Field(description="the task's model calls running in worker threads now")
    speculation: SpeculationPlan | None = Field(
        default=None, description="the task's speculation schedule for a request starting now; None without a draft"
    )


class ServerStats(BaseModel):
    """``GET /stats``: what the server is doing now, and totals since it started.

    The engine's fields at the top level (``engine_requests``, ``in_flight``, ``speculation``)
    are the default task's, as they were when a server served one task; ``tasks`` has every
    served task's, the default first. The admission and the totals are the server's, shared by
    every task."""

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
    speculation: SpeculationPlan | None = Field(
        default=None,
        description="what the speculation schedule gives a request starting now (the load, the draft's "
        "rolling acceptance, the lookahead; 0: the target alone); None without a draft",
    )
    tasks: dict[str, TaskStats] = Field(default_factory=dict, description="each served task by name, the default first")


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
    match event:
        case FinishedEvent(result=r, elapsed_s=t):
            stats = r.stats if timeline else r.stats.model_copy(update={"timeline": []})
            return [
                AnswerMessage(id=request_id, answer=r.answer, steps=r.steps, elapsed_s=t),
                StatsMessage(
                    id=request_id, stats=stats, acceptance_rate=stats.acceptance_rate, queue_wait_s=queue_wait_s
                ),
            ]
        case FailedEvent(error=error, message=message):
            code = _ERROR_CODES.get(error, "model_error")
            return [ErrorMessage(id=request_id, code=code, message=f"{error}: {message}")]
        case _:  # every other event streams as it is
            wire = EVENT_MESSAGES[type(event)]
            return [wire.model_validate({**dict(event), "id": request_id})]


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
    rid = given_id if isinstance(given_id, str) and NAME_PATTERN.fullmatch(given_id) else None
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
