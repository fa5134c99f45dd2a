"""``dreamr serve``: the live page, the WebSocket stream and the OpenAI-compatible API
(``dreamr_websocket``) around the models the flags describe (its arguments are ``cli``'s).

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

from dreamr_app.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, load_reasoner
from dreamr_stream.errors import DreamrError

if TYPE_CHECKING:
    from dreamr_websocket.server import DreamrServer
    from dreamr_websocket.settings import ServerSettings

__all__ = ["TOKEN_ENV", "serve", "settings_from_args"]

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
        reasoner = load_reasoner(args)
        # start from what the target recommends (dreamr.json), then apply the flags given
        reasoner.config = reasoner.config.override(tau=args.tau, max_steps=args.max_steps)
    except DreamrError as e:
        print(f"dreamr serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    loaded_s = time.perf_counter() - t0

    def ready(server: DreamrServer) -> None:
        # the token is never printed whole (terminal scrollback and logs keep it): its owner has it
        url = server.http_url + (f"#token=<the token, {token[:4]}...>" if token else "")
        print(
            f"models loaded in {loaded_s:.1f}s; serving {url}  (WebSocket {server.ws_url}; OpenAI-compatible API "
            f"{server.api_url}, model {server.model_ids()[0]!r}); Ctrl-C stops",
            flush=True,
        )

    try:
        run(reasoner, settings, on_ready=ready)
    except OSError as e:  # e.g. the port is taken
        print(f"dreamr serve: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
