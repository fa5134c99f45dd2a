"""``dreamr serve``: the live page, the WebSocket stream and the OpenAI-compatible API
(``dreamr_websocket``) around the models the flags describe (its arguments are ``cli``'s).

With the shipped demo models (no model flag) it serves every task that ships models (``--task``
narrows that), each task's Reasoner behind one model id (``dreamr-<task>``) and one entry of the
page's picker; the first is the default. With model flags it serves those models, one task, as
it always did (``--task`` then names that task).

Why here, and not in the integration: the command composes the core's ``Reasoner`` with the
WebSocket adapter, which is the application's job; the integration stays an adapter that knows
nothing of the command line. ``cli`` imports this module only when ``serve`` runs, once it has
checked that the ``websocket`` extra is installed (``dreamr --help`` does not need it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from dreamr_app.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, load_reasoner, uses_demo_models
from dreamr_stream.errors import DreamrError

if TYPE_CHECKING:
    from dreamr_websocket.server import DreamrServer
    from dreamr_websocket.settings import ServerSettings

    from dreamr_stream.reasoner import Reasoner

__all__ = ["TOKEN_ENV", "load_reasoners", "serve", "served_task_names", "settings_from_args"]

TOKEN_ENV = "DREAMR_TOKEN"


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """``ServerSettings`` from the ``serve`` arguments; the token falls back to ``$DREAMR_TOKEN``."""
    from dreamr_websocket.settings import ServerSettings

    return ServerSettings(
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        allow_no_token=args.allow_no_token,
        origins=tuple(args.origins),
        max_active=args.max_active,
        max_waiting=args.max_waiting,
        max_connections=args.max_connections,
        max_message_bytes=args.max_message_bytes,
        send_timeout_s=args.send_timeout,
        max_connections_per_address=args.max_connections_per_address,
        max_held_image_bytes=args.max_held_image_bytes,
        requests_per_minute=args.requests_per_minute or None,  # 0: no limit
        idle_timeout_s=args.idle_timeout or None,  # 0: never
        parse_in_thread_bytes=args.parse_in_thread_bytes,
        head_timeout_s=args.head_timeout,
    )


def served_task_names(args: argparse.Namespace) -> list[str] | None:
    """The tasks to serve, the default first: ``--task`` in order (once each), or, with the
    shipped models, every task that ships them; None: the model flags' one Reasoner, whose
    task its target names (as before ``--task``)."""
    from dreamr_stream.backends.shipped import shipped_tasks
    from dreamr_stream.tasks import DEFAULT_TASK

    named = list(dict.fromkeys(args.tasks or []))
    if not uses_demo_models(args):
        if len(named) > 1:
            raise UsageError("the model flags describe one task's models: give --task once, or not at all")
        return named or None
    # none shipped (a package built without weights): the default task's, whose loading says what is missing
    return named or shipped_tasks() or [DEFAULT_TASK]


def load_reasoners(args: argparse.Namespace) -> Reasoner | dict[str, Reasoner]:
    """The Reasoner the model flags describe, or one per served task (``served_task_names``), each
    configured from what its target recommends, then the flags given (``--tau``, ``--max-steps``)."""
    names = served_task_names(args)
    if names is None:
        return _configured(load_reasoner(args), args)
    loaded: dict[str, Reasoner] = {}
    try:
        for name in names:
            # load_reasoner reads one task (``args.task``); serve's flag is the list ``args.tasks``
            loaded[name] = _configured(load_reasoner(argparse.Namespace(**{**vars(args), "task": name})), args)
    except BaseException:
        for reasoner in loaded.values():  # a draft process each, which would outlive the command
            reasoner.close()
        raise
    return loaded


def _configured(reasoner: Reasoner, args: argparse.Namespace) -> Reasoner:
    # start from what the target recommends (dreamr.json), then apply the flags given
    reasoner.config = reasoner.config.override(tau=args.tau, max_steps=args.max_steps)
    return reasoner


def serve(args: argparse.Namespace) -> int:
    from dreamr_websocket.protocol import protocol_schema
    from dreamr_websocket.server import run

    if args.print_schema:
        print(json.dumps(protocol_schema(), indent=2, sort_keys=True))
        return EXIT_OK
    try:
        settings = settings_from_args(args)
        token = settings.token
        t0 = time.perf_counter()
        reasoners = load_reasoners(args)
    except (DreamrError, UsageError) as e:
        print(f"dreamr serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    loaded_s = time.perf_counter() - t0

    def ready(server: DreamrServer) -> None:
        # the token is never printed whole (terminal scrollback and logs keep it): its owner has it
        url = server.http_url + (f"#token=<the token, {token[:4]}...>" if token else "")
        ids = server.model_ids()
        models = f"model{'s' if len(ids) > 1 else ''} {', '.join(repr(i) for i in ids)}"
        print(
            f"models loaded in {loaded_s:.1f}s; serving {url}  (WebSocket {server.ws_url}; OpenAI-compatible API "
            f"{server.api_url}, {models}); Ctrl-C stops",
            flush=True,
        )

    try:
        run(reasoners, settings, on_ready=ready)
    except OSError as e:  # e.g. the port is taken
        print(f"dreamr serve: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
