"""What every command of the application shares: the request value, usage errors and exit codes,
the model flags and the Reasoner they describe, the device check, quiet libraries, a fast exit.

The bottom of ``dreamr_app``: every other module of the package imports it, and it imports none
of them. It stays light (the standard library, and the core's errors): ``dreamr reason`` with a
running daemon imports it, and must not import torch or transformers (which this module only
imports inside the functions that load models or check a device).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from PIL import Image

    from dreamr_stream.reasoner import Reasoner

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Request",
    "UsageError",
    "adapter",
    "add_model_flags",
    "add_task_flag",
    "check_device",
    "exit_now",
    "load_reasoner",
    "quiet_libraries",
    "task_name",
    "uses_demo_models",
]

EXIT_OK = 0
EXIT_FAILED = 1  # the request or a model failed, said in one line
EXIT_USAGE = 2  # bad input on the command line (argparse's own status for the same)


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit status ``EXIT_USAGE``."""


@dataclass(frozen=True)
class Request:
    """One ``dreamr reason`` request: the image and the question, checked."""

    image: Image.Image
    question: str
    expected: int | None = None  # a task item's answer (``--random``)


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


def task_name(name: str) -> str:
    """``--task``'s value: a known task's name (a usage error naming the known ones otherwise)."""
    from dreamr_stream.tasks import task_names

    if name not in task_names():
        raise argparse.ArgumentTypeError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return name


def add_task_flag(p: argparse.ArgumentParser) -> None:
    """``--task``: which task's items a command draws (``dreamr_stream.tasks``; default: the grid task)."""
    p.add_argument(
        "--task", type=task_name, default="grid", help="the task whose items it draws (default: grid, the demo task)"
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


def uses_demo_models(args: argparse.Namespace) -> bool:
    """No model flag given: the shipped demo models answer (and their task's warnings apply)."""
    return not (args.target or args.draft or args.target_url or args.draft_url)


def load_reasoner(args: argparse.Namespace, *, draft_stand_in: bool = False) -> Reasoner:
    """The Reasoner the model flags describe: local folders, served models (``--target-url``,
    ``--draft-url``: vLLM's OpenAI-compatible API), or the shipped demo. ``draft_stand_in``: as
    in ``Reasoner.from_pretrained``."""
    from dreamr_stream.reasoner import Reasoner
    from dreamr_stream.tasks import DEFAULT_TASK

    task = getattr(args, "task", DEFAULT_TASK)  # commands without --task (serve) run the default task's demo
    target_url, draft_url = getattr(args, "target_url", None), getattr(args, "draft_url", None)
    # a draft or target folder of the user's own is loaded as given: never swapped for the demo's
    # (a served target then runs with --target's settings, or warns that it has none)
    if args.target or args.draft or (draft_url and not target_url):
        from dreamr_stream.backends.shipped import demo_paths

        target = target_url or args.target or demo_paths(args.demo_draft, task).target
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
        task=task,
        device=args.device,
        draft_stand_in=draft_stand_in,
        target_url=target_url,
        draft_url=draft_url,
    )


def check_device(device: str) -> None:
    """A device this torch build can use, or a UsageError that says what to do instead."""
    if device == "cpu":  # every build has it; not importing torch here lets the draft's process start first
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise UsageError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: this torch {torch.__version__} sees no CUDA GPU "
            "(a CPU-only build, or no GPU here); use --device cpu, or install a CUDA build of torch"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def adapter(module: str, *, what: str, extra: str) -> ModuleType | None:
    """An integration's module, imported only when a command needs it (``dreamr --help`` and
    ``dreamr reason --no-daemon`` work without the extras); None, with the extra to install said,
    when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        print(f"{what} needs the {extra} extra: pip install 'dreamr-stream[{extra}]' ({e})", file=sys.stderr)
        return None


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
