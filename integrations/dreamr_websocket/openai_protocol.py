"""OpenAI chat completions, as dreamr reads them: the request, and the errors it answers with
(the chunks it streams back are ``openai_chunks.py``).

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
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from dreamr_stream.errors import ConfigError, InputError
from dreamr_websocket.protocol import RequestOptions

__all__ = [
    "OPTION_FIELDS",
    "ChatCompletionRequest",
    "ChatRequest",
    "ErrorType",
    "OpenAIError",
    "OpenAIErrorResponse",
    "api_error",
    "error_for",
    "model_list",
    "parse_chat_request",
]

ErrorType = Literal[
    "invalid_request_error", "authentication_error", "permission_error", "rate_limit_error", "server_error"
]
# dreamr's options, read from the top level of the body (the openai SDK's ``extra_body``)
OPTION_FIELDS: tuple[str, ...] = ("method", "tau", "verify", "lookahead", "fallback", "max_steps", "cache", "drafts")
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
