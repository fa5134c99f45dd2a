"""WebSocket streamer and live web page for dreamr-stream: ``dreamr serve``.

One port serves everything (``websockets``' asyncio server, plain HTTP through
``process_request``):

=================  ==========================================================================
``GET /``          the live page (plain HTML/CSS/JS shipped in the package; no build step)
``GET /ws``        the WebSocket stream (token and Origin checked at the handshake)
``GET /puzzle``    a served task's test item (``?task=grid&seed=7``; the default task and a
                   random seed unless given): ``{task, title, seed, image (data URL), question, answer}``
``GET /tasks``     the served tasks, the default first: ``{default, tasks: [{name, title, model}]}``
``GET /stats``     server state: active, queued, in-flight model calls, totals, per task (``ServerStats``)
``GET /schema.json`` the protocol's JSON Schema (also committed as ``schema/protocol-v1.json``)
=================  ==========================================================================

Protocol v1 (JSON text frames; every message has ``"v": 1`` and a ``type``)
----------------------------------------------------------------------------
Client: ``{"v": 1, "type": "ask", "id": "q1", "image": "<base64 or data:image/...;base64,...>",
"question": "How many red shapes are there?", "task": "grid", "options": {"method": "fpsr", "tau": 1.0}}``;
``{"v": 1, "type": "cancel"}`` stops the running request. ``task`` (optional) is one of the served
tasks (``GET /tasks``); without it the server's default task answers, and a task the server does
not serve is an ``invalid_option`` error naming the served ones. Options (all optional): ``method``,
``tau``, ``verify``, ``lookahead``, ``fallback``, ``max_steps`` (at most the server's), ``cache``,
``drafts`` (send drafted events, default true), ``timeline`` (include lane spans in stats).
Unknown options are an error. One request at a time per connection.

Server: ``hello`` on connect (version, methods, limits). Per request, each with the request's
``id``: ``queued`` {position} (only when it must wait), ``started``, then as they happen
``drafted`` {index, text}, ``verified`` {step (with verdict: p_pos, p_neg, ratio, tau)},
``rejected`` {index, text, verdict}, ``fallback`` {step}, ``cache_hit`` {steps}; it ends with
exactly one of ``answer`` + ``stats`` (``stats`` is last), ``error`` {code, message, retryable}
or ``cancelled``. Error codes: ``bad_json``, ``bad_request``, ``unsupported_version``,
``invalid_option``, ``invalid_image``, ``invalid_question``, ``request_in_progress``, ``busy``
(retryable: the queue is full), ``model_error``, ``internal_error``. After an error event the
connection stays open.

Refusals and close codes
------------------------
At the handshake (HTTP status, no WebSocket): 401 missing or wrong token; 403 Origin or Host
not allowed; 503 too many connections. After it (close code): 1000 normal; 1001 server
shutting down; 1003 a binary frame (send JSON text); 1009 a message over ``max_message_bytes``
(an oversize upload); 1011 server bug. A client that stops reading is aborted without a close
frame once a send has waited ``send_timeout_s`` (it sees 1006).

Security
--------
Loopback by default (a non-loopback host needs a token or ``--allow-no-token``); an optional
token (``--token`` or ``DREAMR_TOKEN``) as ``Authorization: Bearer`` or ``?token=`` (the page
takes it from its URL fragment, ``/#token=...``); browsers may connect only from the page's own
origin or ``--origin`` values, and a loopback server only answers loopback Host names (DNS
rebinding). Images come only as base64: the server never opens a path a client names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "PROTOCOL_VERSION",
    "CloseCode",
    "DreamrServer",
    "ServerSettings",
    "ServerStats",
    "protocol_schema",
    "run",
]

if TYPE_CHECKING:
    from dreamr_websocket.protocol import PROTOCOL_VERSION, CloseCode, ServerStats, protocol_schema
    from dreamr_websocket.server import DreamrServer, run
    from dreamr_websocket.settings import ServerSettings

_HOMES = {
    "PROTOCOL_VERSION": "protocol",
    "CloseCode": "protocol",
    "ServerStats": "protocol",
    "protocol_schema": "protocol",
    "DreamrServer": "server",
    "run": "server",
    "ServerSettings": "settings",
}


def __getattr__(name: str) -> Any:
    """Lazy exports: importing the package (``dreamr reason``'s daemon client does, to find its code)
    must not import the server, and with it the core's engine and models."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"dreamr_websocket.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'dreamr_websocket' has no attribute {name!r}")
