"""The ``dreamr`` command: reason (and its daemon), serve, zoo (train / export / eval)."""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from dreamr_stream.reasoner import Reasoner

__all__ = ["add_model_flags", "entry", "exit_now", "load_reasoner", "main", "quiet_libraries"]


def quiet_libraries() -> None:
    """Keep the model libraries' notices (hub, verbosity, deprecations) off a command's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # no "Loading weights" bars in a CLI; by environment, so that importing transformers waits
    # until a model is loaded (input errors come first) and the draft's child process inherits it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def load_reasoner(args: argparse.Namespace, *, draft_stand_in: bool = False) -> Reasoner:
    """The Reasoner the model flags describe: local folders, served models (``--target-url``,
    ``--draft-url``: vLLM's OpenAI-compatible API), or the shipped demo. ``draft_stand_in``: as
    in ``Reasoner.from_pretrained``."""
    from dreamr_stream.reasoner import Reasoner

    target_url, draft_url = getattr(args, "target_url", None), getattr(args, "draft_url", None)
    if args.target or (draft_url and not target_url):
        from dreamr_stream.zoo.shipped import demo_paths

        target = target_url or args.target or demo_paths(args.demo_draft).target
        settings = args.target if target_url and args.target else None
        return Reasoner.from_pretrained(
            target=target,
            draft=draft_url or args.draft,
            device=args.device,
            draft_stand_in=draft_stand_in,
            settings_from=settings,
        )
    return Reasoner.demo(
        draft=args.demo_draft,
        device=args.device,
        draft_stand_in=draft_stand_in,
        target_url=target_url,
        draft_url=draft_url,
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose the models (folders, served URLs, device), shared by the commands loading them."""
    p.add_argument("--target", help="local target model folder (default: shipped demo)")
    p.add_argument("--draft", help="local draft model folder")
    p.add_argument("--demo-draft", help="which shipped draft the demo uses (default: sapo if shipped, else sft)")
    p.add_argument(
        "--target-url",
        help="the target served by vLLM (http://host:8000/v1); --target then names a local folder whose "
        "dreamr.json (judge, recommended verification) applies to it",
    )
    p.add_argument("--draft-url", help="the draft served by vLLM")
    p.add_argument("--device", default="cpu")


def _reason(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dreamr_stream.cli_reason import UsageError, reason

    console = Console(highlight=False)
    try:
        return reason(args, console)
    except UsageError as e:  # bad input: one line, before any model is loaded
        Console(stderr=True, highlight=False).print(f"[red]dreamr reason: error: {e}[/red]", soft_wrap=True)
        return 2


def _daemon(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dreamr_stream import daemon_files
    from dreamr_stream.errors import DreamrError

    console = Console(highlight=False)
    try:
        return daemon_files.status(console) if args.daemon_cmd == "status" else daemon_files.stop(console)
    except DreamrError as e:
        Console(stderr=True, highlight=False).print(f"[red]dreamr daemon: {e}[/red]", soft_wrap=True)
        return 1


# ``dreamr zoo <command>``: the module of dreamr_stream.zoo whose ``main`` runs it
_ZOO_COMMANDS = {
    "train": "train",
    "export": "export",
    "eval": "evaluate",
    "card": "cards",
    "draft-steps": "draft_steps",
    "tbvm": "tbvm_eval",
    "judge-layers": "judge_layers",
}


def _zoo(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"dreamr_stream.zoo.{_ZOO_COMMANDS[args.zoo_cmd]}")
    return module.main(args.rest) or 0


def _sapo(args: argparse.Namespace) -> int:
    import anyio

    from dreamr_stream.sapo.config import SapoConfig
    from dreamr_stream.sapo.prompts import held_out, prompts_from_log
    from dreamr_stream.sapo.trainer import train
    from dreamr_stream.zoo.prompts import demo_prompts
    from dreamr_stream.zoo.shipped import demo_paths

    cfg = SapoConfig.from_json(Path(args.config)) if args.config else SapoConfig()
    if args.steps is not None:
        cfg = cfg.model_copy(update={"steps": args.steps})
    paths = demo_paths("sft") if not (args.target and args.draft) else None
    target = Path(args.target) if args.target else paths.target  # type: ignore[union-attr]
    draft = Path(args.draft) if args.draft else paths.draft  # type: ignore[union-attr]
    source = demo_prompts(cfg.pool, cfg.eval_prompts, cfg.generation)
    if args.from_log:
        from dreamr_redis import RedisTrajectoryStore  # the CLI is the composition root

        async def load() -> list:  # type: ignore[type-arg]
            store = RedisTrajectoryStore(args.from_log, prefix=args.prefix, timeout_s=5.0)
            entries = await store.read_log(limit=args.log_limit)
            images = {e.image: await store.get_image(e.image) for e in entries}
            await store.aclose()
            return prompts_from_log(entries, {k: v for k, v in images.items() if v})

        prompts = anyio.run(load)
        if not prompts:
            print("no usable prompts in the trajectory log", file=sys.stderr)
            return 1
        source = held_out(prompts, cfg.eval_prompts, cfg.seed)  # validated on puzzles of the log
    print(train(cfg, target, draft, Path(args.out), source))
    return 0


def _bench_served(args: argparse.Namespace) -> int:
    """``dreamr bench --target-url``: FPSR over the served target against it alone."""
    import anyio

    from dreamr_stream.config import CacheConfig

    served = _adapter("dreamr_vllm.bench", what="--target-url", extra="vllm")
    if served is None:
        return 2
    run_levels, to_markdown = served.run_levels, served.to_markdown
    reasoner = load_reasoner(args)
    # every request does its full model work: no trajectory cache (the rounds repeat puzzles)
    config = reasoner.config.model_copy(update={"cache": CacheConfig(enabled=False)})
    if args.tau is not None:
        config = config.model_copy(update={"verification": config.verification.model_copy(update={"tau": args.tau})})
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rows = anyio.run(
        lambda: run_levels(
            {"target_only": reasoner, "fpsr": reasoner},
            config,
            puzzles=args.n,
            concurrency=concurrency,
            rounds=args.rounds,
        )
    )
    meta = {"command": "dreamr bench " + " ".join(sys.argv[2:]), "when": time.strftime("%Y-%m-%d")}
    meta |= {"machine": f"{os.cpu_count()} cores", "puzzles": args.n, "rounds": args.rounds}
    table = to_markdown(rows, meta)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_served.md").write_text(table)
        (Path(args.out) / "bench_served.json").write_text(json.dumps({"meta": meta, "levels": rows}, indent=2))
    print(table)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.target_url:
        return _bench_served(args)
    import torch
    from rich.progress import Progress

    from dreamr_stream.bench import ALL_METHODS, run_bench, save, to_markdown
    from dreamr_stream.zoo.shipped import WEIGHTS, demo_paths

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = demo_paths("sft")
    sapo = (
        Path(args.sapo)
        if args.sapo
        else (WEIGHTS / "draft-sapo" if (WEIGHTS / "draft-sapo" / "config.json").exists() else None)
    )
    methods = tuple(args.methods.split(",")) if args.methods else ALL_METHODS
    with Progress() as bar:
        task = bar.add_task("bench", total=args.n)
        result = run_bench(
            target_dir=Path(args.target) if args.target else paths.target,
            sft_dir=Path(args.draft) if args.draft else paths.draft,
            sapo_dir=sapo,
            n=args.n,
            methods=methods,
            device=args.device,
            tau=args.tau,
            progress=lambda i, n: bar.update(task, completed=i),
        )
    save(result, Path(args.out), args.tag or args.device)
    print(to_markdown(result))
    return 0


def _adapter(module: str, *, what: str, extra: str) -> ModuleType | None:
    """An adapter's module, imported only when a command needs it (the core never imports its
    adapters otherwise); None, with the extra to install said, when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        print(f"{what} needs the {extra} extra: pip install 'dreamr-stream[{extra}]' ({e})", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    websocket = _adapter("dreamr_websocket.cli", what="dreamr serve", extra="websocket")
    return 2 if websocket is None else int(websocket.serve(args))


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="WebSocket server + live web page (http://127.0.0.1:8765/)")
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
    s.add_argument("--tau", type=float, help="default: what the target model recommends, else 1.0")
    s.add_argument("--max-steps", type=int, default=24)
    add_model_flags(s)
    s.add_argument("--print-schema", action="store_true", help="print the protocol's JSON Schema and exit")
    s.set_defaults(fn=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamr", description="Multimodal speculative reasoning, streamed.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("reason", help="answer a question about an image, streaming verified steps")
    r.add_argument("image", nargs="?", help="image file (omit with --random)")
    r.add_argument("question", nargs="?")
    r.add_argument("--random", action="store_true", help="a fresh demo puzzle (image saved to ./dreamr-puzzle.png)")
    r.add_argument("--seed", type=int, help="puzzle seed for --random")
    r.add_argument("--save-image", help="where --random saves its image")
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

    d = sub.add_parser("daemon", help="the resident daemon of `dreamr reason`: status, stop")
    d.add_argument("daemon_cmd", choices=["status", "stop"])
    d.set_defaults(fn=_daemon)

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
    s.set_defaults(fn=_sapo)

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
    b.set_defaults(fn=_bench)

    _add_serve(sub)

    z = sub.add_parser("zoo", help="demo models: train, export, eval, card, draft-steps, tbvm, judge-layers")
    z.add_argument("zoo_cmd", choices=list(_ZOO_COMMANDS))
    z.add_argument("rest", nargs=argparse.REMAINDER)
    z.set_defaults(fn=_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    return int(args.fn(args) or 0)


def exit_now(code: int) -> NoReturn:
    """Exit with ``code`` once the exit handlers have run, without the interpreter's teardown:
    with torch and transformers loaded it took 1.2 s on the 2-core development machine, after
    the command had finished. Nothing of ours needs it: the exit handlers (a draft process
    stopped, logs flushed) run here. Threads other than daemons would be cut off, so with any
    still running the interpreter exits as usual and waits for them."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter runs at exit, before its teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The ``dreamr`` console script: ``main()`` on the command line's arguments, then exit."""
    exit_now(main())


if __name__ == "__main__":
    entry()
