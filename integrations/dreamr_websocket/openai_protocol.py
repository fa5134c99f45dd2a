"""OpenAI chat completions, as dreamr speaks them: the request we read, the errors, the chunks.

Pure (no I/O, no event loop), like ``protocol.py`` for the WebSocket: the routes feed bytes and
engine events in and send back what these functions return, so every decision here is tested
without a server.

What we read (``ChatCompletionRequest``) is the subset of OpenAI's request that has a meaning
here; other standard fields are ignored, as vLLM does, and a field of the wrong type is a 400
that names it. dreamr's own options (``method``, ``tau``, ``verify``, ``lookahead``,
``fallback``, ``max_steps``, ``cache``, ``drafts``) ride as top-level fields (what the openai
SDK sends from ``extra_body``) and are validated as the WebSocket's ``RequestOptions``. The
engine reasons over one image and one question: the last message must be the user's, with
exactly one image (a ``data:image/...;base64,`` URL: the server never fetches a URL or opens a
path) and the question as its text; earlier turns and system prompts are not used (the
model's prompt is its task's own).

What we send back, per request (``ChunkWriter``):

* the first chunk: ``delta.role = "assistant"``;
* each step the user sees (a draft step TBVM verified, a cached one, or one the target wrote:
  the ``verified`` and ``fallback`` events) as one chunk whose ``delta.reasoning`` and
  ``delta.reasoning_content`` (the older name, which DeepSeek-style clients read) hold its
  text, preceded by a newline from the second step on, so that the reasoning put together is
  the steps one per line. ``delta.dreamr`` is the WebSocket protocol's message for that event
  (source, verdict with p_pos / p_neg / ratio / tau, kept part, cost, timing), which OpenAI
  clients ignore. With ``drafts: true`` the ``drafted``, ``rejected`` and ``cache_hit`` events
  come too, as chunks with an empty delta and only ``delta.dreamr``;
* the answer in ``delta.content``: the result's ``answer`` (the text after ``Answer:`` in the
  final step, what ``Reasoner.ainvoke`` returns), or the final step's text when the model ended
  without that prefix. The final step is a reasoning step as well: the reasoning is the whole
  verified trajectory, the content the answer alone;
* a chunk with ``finish_reason``: ``stop``, or ``length`` when ``max_tokens`` was reached or the
  steps ran out (``max_steps``) before an answer; its ``delta.dreamr`` is the ``stats`` message;
* with ``stream_options.include_usage``: a last chunk with ``choices: []`` and ``usage``.

A model failure once the stream has started is one ``{"error": {...}}`` object (what vLLM
sends; the openai SDK raises it as ``APIError``); the routes follow it with ``[DONE]``.

Token counts are not a tokenizer's: the steps come from two models with different tokenizers,
a remote server or the cache, and the events carry text. ``count_tokens`` counts the words and
punctuation marks of the text delivered, the same whatever served it. ``completion_tokens`` is
the reasoning's (the steps' text) plus the answer's; ``prompt_tokens`` is the question's text
only (the image and the model's prompt template are not counted). What the models did (tokens
each wrote, forwards) is in the ``stats`` message. ``max_tokens`` bounds ``completion_tokens``
in that unit: the step or answer that would pass it is cut at the limit, the request is
cancelled, and ``finish_reason`` is ``length``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated, Any, Literal, assert_never

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from dreamr_stream.errors import ConfigError, InputError
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
from dreamr_stream.types import Step
from dreamr_websocket.protocol import RequestOptions, from_event

__all__ = [
    "OPTION_FIELDS",
    "ChatCompletionRequest",
    "ChatRequest",
    "Chunk",
    "ChunkWriter",
    "ErrorType",
    "OpenAIError",
    "OpenAIErrorResponse",
    "api_error",
    "count_tokens",
    "error_for",
    "model_list",
    "parse_chat_request",
    "truncate_tokens",
]

Chunk = dict[str, Any]  # one JSON object, ready for ``json.dumps``
FinishReason = Literal["stop", "length"]
ErrorType = Literal[
    "invalid_request_error", "authentication_error", "permission_error", "rate_limit_error", "server_error"
]
# dreamr's options, read from the top level of the body (the openai SDK's ``extra_body``)
OPTION_FIELDS: tuple[str, ...] = ("method", "tau", "verify", "lookahead", "fallback", "max_steps", "cache", "drafts")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_DATA_URL_HEADER = re.compile(r"data:image/[A-Za-z0-9.+-]+(;[^,;]+)*;base64")
_NOT_DATA_URL = "images must be data URLs (data:image/png;base64,...): the server never fetches URLs or opens paths"


# ---------------------------------------------------------------- errors
class OpenAIError(BaseModel):
    model_config = ConfigDict(frozen=True)
    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error object, with the HTTP status (and ``Retry-After``) it goes out with."""

    model_config = ConfigDict(frozen=True)
    error: OpenAIError
    status: int = Field(exclude=True)
    retry_after_s: float | None = Field(default=None, exclude=True)

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def headers(self) -> dict[str, str]:
        """``Retry-After`` in whole seconds (at least 1) when the client should come back."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


_STATUS: dict[HTTPStatus, tuple[ErrorType, str]] = {  # status -> (type, default code)
    HTTPStatus.BAD_REQUEST: ("invalid_request_error", "invalid_request"),
    HTTPStatus.UNAUTHORIZED: ("authentication_error", "invalid_api_key"),
    HTTPStatus.FORBIDDEN: ("permission_error", "forbidden"),  # a Host or Origin this server refuses
    HTTPStatus.NOT_FOUND: ("invalid_request_error", "model_not_found"),
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: ("invalid_request_error", "request_too_large"),
    HTTPStatus.TOO_MANY_REQUESTS: ("rate_limit_error", "rate_limit_exceeded"),
    HTTPStatus.INTERNAL_SERVER_ERROR: ("server_error", "internal_error"),
    HTTPStatus.SERVICE_UNAVAILABLE: ("server_error", "shutting_down"),
}


def api_error(
    status: HTTPStatus,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry_after_s: float | None = None,
) -> OpenAIErrorResponse:
    """An error in OpenAI's shape for one of the statuses this server answers with.

    400 bad input (``invalid_request_error``), 401 token (``authentication_error``), 404
    ``model_not_found``, 413 an oversize body, 429 rate limit or busy (``rate_limit_error``, with
    ``retry_after_s``), 500 a model failure or a bug (``server_error``), 503 shutting down.
    """
    kind, default_code = _STATUS[status]
    error = OpenAIError(message=message, type=kind, param=param, code=code or default_code)
    return OpenAIErrorResponse(error=error, status=int(status), retry_after_s=retry_after_s)


_INPUT_CODES = {
    "InvalidImageError": "invalid_image",
    "InvalidQuestionError": "invalid_question",
    InputError.__name__: "invalid_request",
    ConfigError.__name__: "invalid_option",
}


def error_for(error: str | Exception, message: str | None = None) -> OpenAIErrorResponse:
    """The error for a failed request: from its exception, or its class name and message (as a
    ``FailedEvent`` has them).

    The input's faults (``InputError``, its image and question kinds, ``ConfigError``) are 400;
    anything else is the model's: 500 ``model_error``.
    """
    if isinstance(error, Exception):
        message = str(error) if message is None else message
        names = [c.__name__ for c in type(error).__mro__]
        error = next((n for n in names if n in _INPUT_CODES), type(error).__name__)
    message = message or error
    if error in _INPUT_CODES:
        return api_error(HTTPStatus.BAD_REQUEST, message, code=_INPUT_CODES[error])
    return api_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{error}: {message}", code="model_error")


# ---------------------------------------------------------------- request
class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # unknown standard fields are ignored


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class ImageURL(_Loose):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model sees the image as it is


class ImagePart(_Loose):
    type: Literal["image_url"]
    image_url: ImageURL


def _tagged(kind: Any, what: str) -> Discriminator:
    """A union's member by ``kind(value)``, tagged ``~name``: ``_param`` leaves tags out of the
    field names it reports, and an unknown kind gets ``what`` as its message."""

    def tag(value: Any) -> str | None:
        name = kind(value)
        return None if name is None else f"~{name}"

    return Discriminator(tag, custom_error_type="invalid_kind", custom_error_message=what)


def _field(key: str, names: tuple[str, ...]) -> Any:
    return lambda value: value.get(key) if isinstance(value, dict) and value.get(key) in names else None


_CONTENT = _tagged(
    lambda v: "text" if isinstance(v, str) else "parts" if isinstance(v, list) else None,
    "content is a string or a list of content parts",
)
TextContent = Annotated[Annotated[str, Tag("~text")] | Annotated[list[TextPart], Tag("~parts")], _CONTENT]
UserPart = Annotated[
    Annotated[TextPart, Tag("~text")] | Annotated[ImagePart, Tag("~image_url")],
    _tagged(_field("type", ("text", "image_url")), "a content part's type is 'text' or 'image_url'"),
]
UserContent = Annotated[Annotated[str, Tag("~text")] | Annotated[list[UserPart], Tag("~parts")], _CONTENT]


class SystemMessage(_Loose):
    role: Literal["system", "developer"]
    content: TextContent


class UserMessage(_Loose):
    role: Literal["user"]
    content: UserContent


class AssistantMessage(_Loose):
    role: Literal["assistant"]
    content: TextContent | None = None


_ROLES = ("system", "developer", "user", "assistant")
Message = Annotated[
    Annotated[SystemMessage, Tag("~system")]
    | Annotated[SystemMessage, Tag("~developer")]
    | Annotated[UserMessage, Tag("~user")]
    | Annotated[AssistantMessage, Tag("~assistant")],
    _tagged(_field("role", _ROLES), "a message's role is 'system', 'developer', 'user' or 'assistant'"),
]


class StreamOptions(_Loose):
    include_usage: bool | None = None


class ChatCompletionRequest(_Loose):
    """The fields of OpenAI's chat completions request that dreamr reads; others are ignored."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(default=None, description="None: the server's first model")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="wins over max_tokens")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    n: int | None = Field(default=None, ge=1)
    options: RequestOptions = Field(description="dreamr's options, gathered from the top level")

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data: Any) -> Any:
        """dreamr's top-level fields become ``options`` (drafted events off unless asked for)."""
        if not isinstance(data, dict):
            return data
        rest = {k: v for k, v in data.items() if k not in OPTION_FIELDS}
        return {**rest, "options": {"drafts": False, **{k: data[k] for k in OPTION_FIELDS if k in data}}}


class ChatRequest(BaseModel):
    """What a valid request asks for: one image, one question, dreamr's options, the output's shape."""

    model_config = ConfigDict(frozen=True)
    image: str = Field(repr=False, description="the image's base64 text (from its data: URL)")
    question: str
    options: RequestOptions
    model: str | None
    stream: bool
    include_usage: bool
    max_tokens: int | None = Field(description="completion tokens (reasoning + answer), count_tokens' unit")


def _param(loc: Sequence[int | str]) -> str:
    """A validation error's location as the client wrote it: dreamr's options sit at the top
    level, and the unions' tags (``~...``) are not in the body."""
    parts = [str(p) for p in loc if not str(p).startswith("~")]
    return ".".join(parts[1:] if parts[:1] == ["options"] else parts)


def _invalid(e: ValidationError) -> OpenAIErrorResponse:
    """400 naming the fields, never echoing their values (an image can be megabytes)."""
    errors = e.errors(include_input=False, include_url=False)
    params = [_param(err["loc"]) for err in errors]
    detail = "; ".join(f"{p or 'body'}: {err['msg']}" for p, err in zip(params, errors[:4], strict=False))
    return api_error(HTTPStatus.BAD_REQUEST, detail, param=params[0] or None)


def _image_and_question(messages: Sequence[Any]) -> tuple[str, str] | OpenAIErrorResponse:
    """The last message's image (its base64 text) and question, or the 400 that says what is wrong."""
    last = len(messages) - 1
    if not isinstance(messages[last], UserMessage):
        return api_error(
            HTTPStatus.BAD_REQUEST, "the last message must be the user's: the image and the question", param="messages"
        )
    content = messages[last].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
    images = [(i, p) for i, p in enumerate(parts) if isinstance(p, ImagePart)]
    if len(images) != 1:
        found = "no image" if not images else f"{len(images)} images"
        message = f"exactly one image is required, in the last user message (found {found})"
        return api_error(HTTPStatus.BAD_REQUEST, message, param=f"messages.{last}.content", code="invalid_image")
    index, image = images[0]
    header, comma, data = image.image_url.url.partition(",")
    if not comma or not _DATA_URL_HEADER.fullmatch(header) or not data:
        param = f"messages.{last}.content.{index}.image_url.url"
        return api_error(HTTPStatus.BAD_REQUEST, _NOT_DATA_URL, param=param, code="invalid_image")
    question = "\n".join(p.text for p in parts if isinstance(p, TextPart))
    return data, question


def parse_chat_request(data: bytes) -> ChatRequest | OpenAIErrorResponse:
    """A valid request, or the 400 to answer with (never an exception)."""
    try:
        body = json.loads(data)
    except RecursionError:
        return api_error(HTTPStatus.BAD_REQUEST, "the body is JSON nested too deeply")
    except ValueError as e:
        return api_error(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {type(e).__name__}")
    if not isinstance(body, dict):
        return api_error(HTTPStatus.BAD_REQUEST, "the body is a JSON object (OpenAI's chat completions request)")
    try:
        request = ChatCompletionRequest.model_validate(body, strict=True)
    except ValidationError as e:
        return _invalid(e)
    except RecursionError:
        return api_error(HTTPStatus.BAD_REQUEST, "the body is JSON nested too deeply")
    if request.temperature not in (None, 0):
        message = "only greedy decoding is supported: temperature must be 0 or absent"
        return api_error(HTTPStatus.BAD_REQUEST, message, param="temperature", code="unsupported_value")
    if request.n not in (None, 1):
        message = "one choice per request: n must be 1 or absent"
        return api_error(HTTPStatus.BAD_REQUEST, message, param="n", code="unsupported_value")
    found = _image_and_question(request.messages)
    if isinstance(found, OpenAIErrorResponse):
        return found
    image, question = found
    return ChatRequest(
        image=image,
        question=question,
        options=request.options,
        model=request.model,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        max_tokens=request.max_completion_tokens or request.max_tokens,
    )


def model_list(ids: Sequence[str], created: int) -> dict[str, Any]:
    """``GET /v1/models``: OpenAI's list object."""
    data = [{"id": i, "object": "model", "created": created, "owned_by": "dreamr"} for i in ids]
    return {"object": "list", "data": data}


# ---------------------------------------------------------------- tokens
def count_tokens(text: str) -> int:
    """Words and punctuation marks: a count that does not depend on which model wrote the text."""
    return sum(1 for _ in _TOKEN.finditer(text))


def truncate_tokens(text: str, n: int) -> str:
    """``text`` up to the end of its ``n``-th token (``count_tokens``' unit)."""
    if n <= 0:
        return ""
    end = 0
    for i, match in enumerate(_TOKEN.finditer(text)):
        if i == n:
            break
        end = match.end()
    else:
        return text
    return text[:end]


# ---------------------------------------------------------------- responses
def _final_answer(steps: Sequence[Step], answer: str | None) -> str | None:
    """The content: the text after ``Answer:``, else a final step's text; None: no answer came."""
    if answer is not None:
        return answer
    return steps[-1].text if steps and steps[-1].is_final else None


class ChunkWriter:
    """One request's engine events in, its ``chat.completion.chunk`` objects out (no I/O).

    ``feed`` each event and send what it returns; once ``done``, stop the request (close the
    engine's stream): it finished, failed (``error``), or reached ``max_tokens``. The same
    writer gives the non-streamed ``chat.completion`` (``completion()``), so both forms say the
    same thing.
    """

    def __init__(
        self,
        *,
        request_id: str,
        model: str,
        created: int,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
        include_usage: bool = False,
        drafts: bool = False,
    ) -> None:
        self.id = request_id
        self.model = model
        self.created = created
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.include_usage = include_usage
        self.drafts = drafts
        self.steps: list[Step] = []
        self.reasoning: list[str] = []  # what each step's chunk said
        self.content: str | None = None
        self.reasoning_tokens = 0
        self.content_tokens = 0
        self.stats: dict[str, Any] | None = None  # the WebSocket protocol's ``stats`` message
        self.queue_wait_s = 0.0  # set by the caller once the request has a slot; goes in ``stats``
        self.finish_reason: FinishReason | None = None
        self.error: OpenAIErrorResponse | None = None
        self._started = False

    @property
    def done(self) -> bool:
        """The request has nothing more to say: stop it."""
        return self.finish_reason is not None or self.error is not None

    @property
    def completion_tokens(self) -> int:
        return self.reasoning_tokens + self.content_tokens

    def start(self, dreamr: dict[str, Any] | None = None) -> list[Chunk]:
        """The first chunk (the assistant's role), once; ``dreamr`` e.g. a ``queued`` message."""
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""}, dreamr=dreamr)]

    def feed(self, event: Event) -> list[Chunk]:
        """The chunks for one event (the first chunk too, if not sent yet); none once ``done``."""
        if self.done:
            return []
        return self.start() + self._chunks(event)

    def _chunks(self, event: Event) -> list[Chunk]:
        match event:
            case StartedEvent():
                return []
            case DraftedEvent() | RejectedEvent() | CacheHitEvent():
                return [self._chunk({}, dreamr=self._message(event))] if self.drafts else []
            case VerifiedEvent(step=step) | FallbackEvent(step=step):
                return self._step(step, self._message(event))
            case FinishedEvent(result=result):
                stats = from_event(event, self.id, queue_wait_s=self.queue_wait_s)[-1]
                self.stats = stats.model_dump(mode="json")
                return self._answer(_final_answer(result.steps, result.answer))
            case FailedEvent(error=error, message=message):
                self.error = error_for(error, message)
                return [self.error.body()]
            case _:
                assert_never(event)

    def _message(self, event: Event) -> dict[str, Any]:
        """The WebSocket protocol's message for ``event``: what ``delta.dreamr`` holds."""
        return from_event(event, self.id)[0].model_dump(mode="json")

    def _fit(self, text: str) -> tuple[str, bool]:
        """``text`` within what is left of ``max_tokens``, and whether it had to be cut."""
        if self.max_tokens is None:
            return text, False
        left = self.max_tokens - self.completion_tokens
        return (text, False) if count_tokens(text) <= left else (truncate_tokens(text, left), True)

    def _step(self, step: Step, dreamr: dict[str, Any]) -> list[Chunk]:
        text, cut = self._fit(step.text)
        piece = ("\n" if self.reasoning else "") + text
        self.steps.append(step)
        self.reasoning.append(piece)
        self.reasoning_tokens += count_tokens(text)
        chunks = [self._chunk({"reasoning": piece, "reasoning_content": piece}, dreamr=dreamr)]
        if cut or (self.max_tokens is not None and self.completion_tokens >= self.max_tokens):
            chunks += self._end("length")  # no room left for the answer
        return chunks

    def _answer(self, answer: str | None) -> list[Chunk]:
        if answer is None:  # the steps ran out (max_steps) before an answer
            return self._end("length")
        text, cut = self._fit(answer)
        self.content = text
        self.content_tokens = count_tokens(text)
        chunks = [self._chunk({"content": text})] if text else []
        return chunks + self._end("length" if cut else "stop")

    def _end(self, reason: FinishReason) -> list[Chunk]:
        self.finish_reason = reason
        chunks = [self._chunk({}, dreamr=self.stats, finish_reason=reason)]
        if self.include_usage:
            chunks.append({**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage()})
        return chunks

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object, in ``count_tokens``' unit (see the module's docstring)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def completion(self) -> dict[str, Any]:
        """The whole answer as one ``chat.completion`` (call once ``done`` without ``error``)."""
        reasoning = "".join(self.reasoning) or None
        steps = [s.model_dump(mode="json") for s in self.steps]
        message = {
            "role": "assistant",
            "content": self.content,
            "reasoning": reasoning,
            "reasoning_content": reasoning,
            "dreamr": {"steps": steps, "stats": self.stats},
        }
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason or "stop", "logprobs": None}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage()}

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(
        self, delta: dict[str, Any], *, dreamr: dict[str, Any] | None = None, finish_reason: FinishReason | None = None
    ) -> Chunk:
        if dreamr is not None:
            delta = {**delta, "dreamr": dreamr}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}
