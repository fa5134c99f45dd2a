"""The ``dreamr`` command: its parser (one small function per subcommand's arguments) and the
dispatch to the module that runs each command.

A command's module is imported only when that command runs: ``dreamr --help`` and ``dreamr
reason`` with a running daemon must not pay for torch, transformers or the adapters.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from dreamr_app.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    UsageError,
    adapter,
    add_model_flags,
    add_task_flag,
    exit_now,
    quiet_libraries,
    task_name,
)

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["ZOO_COMMANDS", "build_parser", "daemon_usable", "entry", "main"]

# ``dreamr zoo <command>``: the module of dreamr_stream.zoo whose ``main`` runs it
ZOO_COMMANDS = {
    "train": "train",
    "export": "export",
    "eval": "evaluate",
    "card": "cards",
    "draft-steps": "draft_steps",
    "tbvm": "tbvm_eval",
    "judge-layers": "judge_layers",
}


# ---------------------------------------------------------------------------------- dispatch
def daemon_usable(args: argparse.Namespace) -> bool:
    """The daemon, unless ``--no-daemon``, or this system has no unix sockets, or not the server's packages."""
    import importlib.util
    import socket

    if getattr(args, "no_daemon", False) or not hasattr(socket, "AF_UNIX"):
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("websockets", "starlette", "uvicorn"))


def _reason(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    try:
        if daemon_usable(args):
            from dreamr_app.daemon.client import reason

            return reason(args, console)
        from dreamr_app.reason import reason_here

        return reason_here(args, console)
    except UsageError as e:  # bad input: one line, before any model is loaded
        Console(stderr=True, highlight=False).print(
            f"[red]dreamr reason: error: {escape(str(e))}[/red]", soft_wrap=True
        )
        return EXIT_USAGE


def _daemon(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from dreamr_app.daemon import files
    from dreamr_stream.errors import DreamrError

    console = Console(highlight=False)
    try:
        return files.status(console) if args.daemon_cmd == "status" else files.stop(console)
    except DreamrError as e:
        Console(stderr=True, highlight=False).print(f"[red]dreamr daemon: {escape(str(e))}[/red]", soft_wrap=True)
        return EXIT_FAILED


def _zoo(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"dreamr_stream.zoo.{ZOO_COMMANDS[args.zoo_cmd]}")
    return module.main(args.rest) or 0


def _sapo(args: argparse.Namespace) -> int:
    from dreamr_app.sapo import train

    return train(args)


def _bench(args: argparse.Namespace) -> int:
    from dreamr_app import bench

    return bench.served(args) if args.target_url else bench.local(args)


def _calibrate(args: argparse.Namespace) -> int:
    from dreamr_app import calibrate

    return calibrate.run(args)


def _serve(args: argparse.Namespace) -> int:
    # the WebSocket integration is an extra: without it, say which, in one line
    if adapter("dreamr_websocket.server", what="dreamr serve", extra="websocket") is None:
        return EXIT_USAGE
    from dreamr_app.serve import serve

    return serve(args)


# ---------------------------------------------------------------------------------- arguments
def _add_reason(sub: Subparsers) -> None:
    r = sub.add_parser("reason", help="answer a question about an image, streaming verified steps")
    r.add_argument("image", nargs="?", help="image file (omit with --random)")
    r.add_argument("question", nargs="?")
    r.add_argument("--random", action="store_true", help="a fresh demo puzzle (image saved to ./dreamr-puzzle.png)")
    r.add_argument("--seed", type=int, help="puzzle seed for --random")
    r.add_argument("--save-image", help="where --random saves its image")
    add_task_flag(r)
    r.add_argument("--events", action="store_true", help="also show drafts, rejections and verdicts")
    r.add_argument("--method", default="fpsr", choices=["fpsr", "sequential", "target_only", "draft_only"])
    r.add_argument("--tau", type=float, help="default: what the target model recommends, else 1.0")
    r.add_argument("--verify", choices=["judge", "likelihood"], help="default: what the target model recommends")
    r.add_argument("--lookahead", type=int, default=2)
    r.add_argument("--fallback", default="auto", choices=["on", "off", "auto"])
    r.add_argument("--max-steps", type=int, default=24)
    r.add_argument(
        "--compare",
        action="store_true",
        help="then run the target alone on the same input and print the measured speed-up "
        "(default: an estimate from the target's first step timed alone)",
    )
    r.add_argument(
        "--no-daemon",
        action="store_true",
        help="load the models in this process for this request, without the resident daemon that keeps them "
        "loaded between commands (started by default; `dreamr daemon stop` stops it)",
    )
    r.add_argument(
        "--daemon-idle",
        type=float,
        metavar="SECONDS",
        help="a daemon started now exits after this long without a request (default: $DREAMR_DAEMON_IDLE, else 600)",
    )
    add_model_flags(r)
    r.set_defaults(fn=_reason)


def _add_daemon(sub: Subparsers) -> None:
    d = sub.add_parser("daemon", help="the resident daemon of `dreamr reason`: status, stop")
    d.add_argument("daemon_cmd", choices=["status", "stop"])
    d.set_defaults(fn=_daemon)


def _add_sapo(sub: Subparsers) -> None:
    s = sub.add_parser("sapo", help="train the draft with SAPO (RL towards the target)")
    s.add_argument("sapo_cmd", choices=["train"])
    s.add_argument("--target", help="target model folder (default: shipped demo target)")
    s.add_argument("--draft", help="starting draft folder (default: shipped SFT draft)")
    s.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, curves.png, final/")
    s.add_argument("--config", help="JSON file of SapoConfig fields")
    s.add_argument("--steps", type=int)
    s.add_argument("--from-log", help="read rollout prompts from a Redis trajectory log (redis://...)")
    s.add_argument("--prefix", default="dreamr:", help="key prefix of that trajectory store")
    s.add_argument("--log-limit", type=int, default=10_000)
    add_task_flag(s)
    s.set_defaults(fn=_sapo)


def _add_bench(sub: Subparsers) -> None:
    b = sub.add_parser("bench", help="speed and accuracy of every method, side by side")
    b.add_argument("-n", type=int, default=50, help="test prompts")
    b.add_argument("--methods", help="comma-separated subset (default: all)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--tau", type=float, help="default: what the target model recommends")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--target")
    b.add_argument("--draft", help="SFT draft folder")
    b.add_argument("--sapo", help="SAPO draft folder (default: shipped, if any)")
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--tag", help="file name tag (default: the device)")
    b.add_argument("--target-url", help="bench FPSR over this served target (vLLM) against it alone")
    b.add_argument("--draft-url", help="with --target-url: the draft served by vLLM too")
    b.add_argument("--demo-draft", help="with --target-url: which shipped draft (default: sapo if shipped)")
    b.add_argument("--concurrency", default="1", help="with --target-url: requests in flight, e.g. 1,16")
    b.add_argument("--rounds", type=int, default=2, help="with --target-url: rounds per method and load")
    add_task_flag(b)
    b.set_defaults(fn=_bench)


def _add_calibrate(sub: Subparsers) -> None:
    from dreamr_app.calibrate import add_arguments

    c = sub.add_parser(
        "calibrate",
        help="measure TBVM's tau for a target (a served one has no dreamr.json) and write a settings folder",
        description="Score held-out items of the task (the val split) with the target, in every verification "
        "mode it supports; choose each mode's tau and the mode; write OUT/dreamr.json, which settings_from= "
        "(or --target with --target-url) applies.",
    )
    add_arguments(c)
    add_task_flag(c)
    c.set_defaults(fn=_calibrate)


def _add_serve(sub: Subparsers) -> None:
    s = sub.add_parser(
        "serve", help="live web page, WebSocket stream and OpenAI-compatible API on one port (http://127.0.0.1:8765/)"
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    s.add_argument("--token", help="require this token at the handshake (default: $DREAMR_TOKEN)")
    s.add_argument("--allow-no-token", action="store_true", help="permit a non-loopback host without a token")
    s.add_argument("--origin", action="append", default=[], dest="origins", metavar="URL",
                   help="also accept WebSockets from this page origin (repeatable; '*' = any)")  # fmt: skip
    s.add_argument("--max-active", type=int, default=4, help="requests running at once (default: 4)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests queued before 'busy' (default: 64)")
    s.add_argument("--max-connections", type=int, default=256, help="open WebSockets (default: 256)")
    s.add_argument("--max-message-bytes", type=int, default=8 * 2**20, help="largest upload (default: 8 MiB)")
    s.add_argument("--send-timeout", type=float, default=10.0, help="abort a client that stops reading (s)")
    s.add_argument("--max-connections-per-address", type=int, default=16,
                   help="open WebSockets and running API requests from one client address (default: 16)")  # fmt: skip
    s.add_argument("--max-held-image-bytes", type=int, default=256 * 2**20,
                   help="decoded images of running and queued requests before 'busy' (default: 256 MiB)")  # fmt: skip
    s.add_argument("--requests-per-minute", type=float, default=120.0,
                   help="requests a minute from one address; 0 = no limit (default: 120)")  # fmt: skip
    s.add_argument("--idle-timeout", type=float, default=60.0,
                   help="close a connection with no request for this long, in s; 0 = never (default: 60)")  # fmt: skip
    s.add_argument("--head-timeout", type=float, default=10.0,
                   help="drop a connection whose first request head takes longer, in s (default: 10)")  # fmt: skip
    s.add_argument("--parse-in-thread-bytes", type=int, default=64 * 2**10,
                   help="parse larger messages in a worker thread (default: 64 KiB)")  # fmt: skip
    s.add_argument("--tau", type=float, help="default: what the target model recommends, else 1.0")
    s.add_argument("--max-steps", type=int, default=24)
    add_model_flags(s)
    s.add_argument("--task", action="append", type=task_name, dest="tasks", metavar="NAME",
                   help="serve this task (repeatable; default: every task with shipped demo models); "
                   "with model flags, the one task those models answer")  # fmt: skip
    s.add_argument("--print-schema", action="store_true", help="print the protocol's JSON Schema and exit")
    s.set_defaults(fn=_serve)


def _add_zoo(sub: Subparsers) -> None:
    z = sub.add_parser("zoo", help="demo models: train, export, eval, card, draft-steps, tbvm, judge-layers")
    z.add_argument("zoo_cmd", choices=list(ZOO_COMMANDS))
    z.add_argument("rest", nargs=argparse.REMAINDER)
    z.set_defaults(fn=_zoo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamr", description="Multimodal speculative reasoning, streamed.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_reason, _add_daemon, _add_sapo, _add_bench, _add_calibrate, _add_serve, _add_zoo):
        add(sub)
    return parser


# ---------------------------------------------------------------------------------- entry
def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    return int(args.fn(args) or 0)


def entry() -> NoReturn:
    """The ``dreamr`` console script: ``main()`` on the command line's arguments, then exit."""
    exit_now(main())


if __name__ == "__main__":
    entry()
