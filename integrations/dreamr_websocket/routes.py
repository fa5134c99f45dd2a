"""Plain HTTP beside the WebSocket on the same port: the page, a demo puzzle, the served tasks,
stats, the schema, and the gates every route shares.

The demo puzzle is an item of a served task's test split (``GET /puzzle?task=NAME&seed=N``; the
server's default task's and a random seed unless told), made by the task itself, so that a new
task needs no change here. ``GET /tasks`` tells the page which tasks are served, with each
one's title (for its picker, and to say what a demo image shows) and model id.

Why on one port: the page connects back to the origin it came from, so no CORS and one
Origin rule. Only a fixed table of static files is served (a client never names a path),
and the handshake gates live here as pure functions of the request, so they are easy to test:
the token (``Authorization: Bearer`` header, or ``?token=`` on the WebSocket only, since browsers
cannot set headers on one) and the Origin / Host allowlists (against cross-site WebSocket hijacking and
DNS rebinding of a loopback server).
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import secrets
from functools import cache
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection
from starlette.responses import Response

from dreamr_stream.errors import ConfigError
from dreamr_stream.tasks import DEFAULT_TASK, TaskLike, as_task
from dreamr_websocket.served import ServedTasks
from dreamr_websocket.settings import LOOPBACK_HOSTS, ServerSettings

__all__ = [
    "STATIC",
    "DemoPuzzle",
    "ServedTaskInfo",
    "ServedTasksInfo",
    "demo_puzzle",
    "host_allowed",
    "json_response",
    "origin_allowed",
    "puzzle_response",
    "query",
    "response",
    "served_tasks",
    "static_file",
    "text_response",
    "token_ok",
]

# path -> (file in the package's static/ folder, content type); nothing else is ever read
STATIC: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class DemoPuzzle(BaseModel):
    """``GET /puzzle``: a fresh image of a task with its question and known answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    task: str = Field(description="the task's name")
    title: str = Field(description="the task's one-line title: what its images show and its questions ask")
    seed: int = Field(description="the item's index in the task's test split")
    image: str = Field(description="data:image/png;base64,...")
    question: str
    answer: str


class ServedTaskInfo(BaseModel):
    """One served task, as the page's picker shows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="what a request's 'task' and /puzzle's ?task= take")
    title: str = Field(description="the task's one-line title")
    model: str = Field(description="its OpenAI model id (/v1/models)")


class ServedTasksInfo(BaseModel):
    """``GET /tasks``: the served tasks in order, and the one a request without a task gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    default: str
    tasks: list[ServedTaskInfo]


# on every response: nothing cached, nothing sniffed, nothing leaked in Referer, nothing framed
SECURITY_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": _CSP,
}


def response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    # Connection: close, as a plain page fetch needs nothing more (the streams keep their own connections)
    headers = {"Connection": "close", **SECURITY_HEADERS}
    return Response(body, status.value, headers, media_type=content_type)


def text_response(status: HTTPStatus, message: str) -> Response:
    return response(status, f"{message}\n".encode(), "text/plain; charset=utf-8")


def json_response(payload: Any, status: HTTPStatus = HTTPStatus.OK) -> Response:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return response(status, body.encode(), "application/json")


@cache
def static_file(name: str) -> bytes:
    return resources.files("dreamr_websocket").joinpath("static", name).read_bytes()


def query(request: HTTPConnection) -> dict[str, str]:
    """The last value of each query parameter."""
    return {k: v for k, v in request.query_params.items()}


def token_ok(request: HTTPConnection, token: str | None, *, allow_query: bool = False) -> bool:
    """No token configured, or the request carries it (constant-time comparison).

    ``?token=`` only where ``allow_query`` (the page's own WebSocket: a browser cannot set headers
    on one); anywhere else a token in the URL would end up in logs, history and Referer headers.
    """
    if token is None:
        return True
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    else:
        given = query(request).get("token", "") if allow_query else ""
    return hmac.compare_digest(given.encode(), token.encode())


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8765
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def host_allowed(request: HTTPConnection, settings: ServerSettings) -> bool:
    """On a loopback server the Host must be a loopback name (or an allowed origin's host).

    A DNS-rebinding page resolves its own name to 127.0.0.1; its requests then carry that
    name in Host, and this refuses them. A public server relies on the token instead.
    """
    if not settings.loopback:
        return True
    name = _hostname(request.headers.get("Host", "")).lower()
    extra = {(urlsplit(o).hostname or "").lower() for o in settings.origins if o != "*"}
    return name in LOOPBACK_HOSTS or name in extra


def origin_allowed(request: HTTPConnection, settings: ServerSettings) -> bool:
    """Browsers send Origin: it must be the page's own origin or in the allowlist.

    A request without Origin is not from a browser page (nothing to hijack): allowed, and
    the token, when set, still applies.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if "*" in settings.origins or origin in settings.origins:
        return True
    host = request.headers.get("Host", "")
    return bool(host) and origin in (f"http://{host}", f"https://{host}") and host_allowed(request, settings)


def demo_puzzle(seed: int | None = None, *, task: TaskLike = DEFAULT_TASK) -> DemoPuzzle:
    """Item ``seed`` of ``task``'s test split (a random one unless ``seed`` is given)."""
    chosen = as_task(task)
    seed = secrets.randbelow(10**6) if seed is None else seed
    item = chosen.item("test", seed)
    buf = io.BytesIO()
    item.image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return DemoPuzzle(
        task=chosen.name,
        title=chosen.title,
        seed=seed,
        image=f"data:image/png;base64,{data}",
        question=item.question,
        answer=str(item.answer),
    )


def _bad_request(message: str) -> Response:
    return text_response(HTTPStatus.BAD_REQUEST, message)


def served_tasks(tasks: ServedTasks) -> ServedTasksInfo:
    """``GET /tasks``: what the page needs to offer each served task."""
    infos = [ServedTaskInfo(name=t.name, title=t.title, model=t.model) for t in tasks]
    return ServedTasksInfo(default=tasks.default.name, tasks=infos)


def puzzle_response(request: HTTPConnection, tasks: ServedTasks) -> Response:
    """``GET /puzzle[?task=NAME][&seed=N]``: an item of a served task (the default task's without
    ``task``) as ``demo_puzzle``'s JSON, or 400 naming what is wrong."""
    params = query(request)
    seed = params.get("seed")
    if seed is not None and not (seed.isdigit() and len(seed) <= 9):
        return _bad_request("seed must be a non-negative integer")
    try:
        # only a served task's: a puzzle is for asking, and no model here would answer another's
        name = tasks.task(params.get("task")).name
        puzzle = demo_puzzle(int(seed) if seed is not None else None, task=name)
    except ConfigError as e:  # a task not served, or one this process does not know: the message says which
        return _bad_request(str(e))
    return json_response(puzzle)
