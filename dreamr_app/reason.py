"""``dreamr reason``: check the input, load the models, stream the verified steps, compare with the target alone.

Everything a user can get wrong (a missing file, a file that is no image, an empty question, a
device this torch cannot use) is checked before any model loads, and reported in one line.

By default the models live in a resident daemon (``dreamr_app.daemon.client``, which imports this
module; the daemon's files and start are ``dreamr_app.daemon.files``), which this command starts if
none runs; ``--no-daemon`` loads them here (``reason_here``). Both paths feed the same events to the
same ``run`` (rendering, summary, the comparison with the target alone) through an ``Engine``.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, assert_never

from rich.console import Console
from rich.markup import escape

from dreamr_app.common import (
    EXIT_FAILED,
    EXIT_OK,
    Request,
    UsageError,
    check_device,
    load_reasoner,
    uses_demo_models,
)
from dreamr_stream.errors import DreamrError, InputError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dreamr_stream.config import ReasonerConfig
    from dreamr_stream.events import Event
    from dreamr_stream.reasoner import Method, Reasoner
    from dreamr_stream.types import ReasoningResult

__all__ = [
    "Comparison",
    "Engine",
    "LocalEngine",
    "estimate_alone",
    "load",
    "measure_alone",
    "prepare",
    "read_request",
    "reason_here",
    "run",
    "warn",
]


@dataclass(frozen=True)
class Comparison:
    """The request's wall time against the target alone, measured or estimated."""

    wall_s: float
    target_alone_s: float
    how: str  # what the target-alone time is: "measured" or how it was estimated

    @property
    def speedup(self) -> float:
        return self.target_alone_s / max(self.wall_s, 1e-9)

    def line(self, method: str) -> str:
        approx = "" if self.how == "measured" else "≈"
        ratio = f"{self.speedup:.2f}x faster" if self.speedup >= 1 else f"{1 / self.speedup:.2f}x slower"
        return (
            f"{method} {self.wall_s:.2f} s, the target alone {approx}{self.target_alone_s:.2f} s: "
            f"{approx}{ratio} ({self.how})"
        )


class Engine(Protocol):
    """Where the models are: this process (``LocalEngine``) or the daemon (``daemon.client.RemoteEngine``)."""

    def stream(self, request: Request, method: Method) -> AsyncIterator[Event]:
        """The request's events, configured by the command's flags."""
        ...

    async def alone(self, request: Request, max_steps: int | None = None) -> ReasoningResult:
        """The target alone on the request, without the trajectory cache; at most ``max_steps`` steps."""
        ...


# ---------------------------------------------------------------------------------- input
def random_request(args: argparse.Namespace, console: Console) -> Request:
    """A fresh item of the demo task's test split (its image saved, so the user can look at it)."""
    from dreamr_stream.tasks import get_task

    seed = args.seed if args.seed is not None else random.randrange(10**6)
    item = get_task(args.task).item("test", seed)
    saved = Path(args.save_image or "dreamr-puzzle.png")
    item.image.save(saved)
    console.print(f"[dim]puzzle test#{seed} saved to {escape(str(saved))}[/dim]")
    question = check_question_arg(args.question or item.question)
    return Request(item.image, question, item.answer if args.question is None else None)


def file_request(args: argparse.Namespace) -> Request:
    from dreamr_stream.inputs import load_image

    if not args.question:
        raise UsageError('a question is required with an image: dreamr reason IMAGE "QUESTION"')
    question = check_question_arg(args.question)
    path = Path(args.image)
    if not path.is_file():
        raise UsageError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        image = load_image(path)
    except InputError as e:
        raise UsageError(f"{args.image}: {e}") from e
    return Request(image, question)


def check_question_arg(question: str) -> str:
    from dreamr_stream.inputs import check_question

    try:
        return check_question(question)
    except InputError as e:
        raise UsageError(str(e)) from e


# ---------------------------------------------------------------------------------- models
def load(args: argparse.Namespace, console: Console) -> Reasoner:
    """The models, with a spinner while they load, configured by the flags."""
    t0 = time.perf_counter()
    with console.status("loading the models…", spinner="dots"):
        # the first request must not wait for the draft's process to start: a copy of the
        # draft in this process serves until it is ready
        reasoner = load_reasoner(args, draft_stand_in=True)
    # the target's recommended verification (dreamr.json), then the flags given
    reasoner.config = reasoner.config.override(
        tau=args.tau,
        mode=args.verify,
        max_steps=args.max_steps,
        lookahead=min(args.lookahead, args.max_steps),
        fallback=args.fallback,
    )
    console.print(f"[dim]models loaded in {time.perf_counter() - t0:.2f}s[/dim]")
    return reasoner


# ---------------------------------------------------------------------------------- output
def show(event: Event, args: argparse.Namespace, console: Console) -> None:
    """One line per event worth showing: verified and fallback steps (a repaired step shows the
    draft's kept start, then the target's tail); drafts, rejections and cache hits with --events."""
    from dreamr_stream import events as ev

    t = f"[dim]{event.elapsed_s:6.2f}s[/dim]"
    match event:
        case ev.DraftedEvent() if args.events:
            console.print(f"{t} [dim]  draft #{event.index}: {escape(event.text)}[/dim]")
        case ev.RejectedEvent() if args.events:
            ratio = f"ratio {event.verdict.ratio:.3g}"
            console.print(f"{t} [red]  rejected #{event.index} ({ratio}): [strike]{escape(event.text)}[/strike][/red]")
        case ev.CacheHitEvent() if args.events:
            console.print(f"{t} [dim]  cache: {event.steps} steps to verify[/dim]")
        case ev.VerifiedEvent(step=step):
            v = step.verdict
            why = f" [dim](ratio {v.ratio:.3g})[/dim]" if v is not None and args.events else ""
            console.print(f"{t} [green]✓ {step.source.value:6}[/green] {escape(step.text)}{why}")
        case ev.FallbackEvent(step=step) if step.kept:
            tail = escape(step.text[len(step.kept) :])
            console.print(f"{t} [yellow]● repair[/yellow] {escape(step.kept)}[yellow]{tail}[/yellow]")
        case ev.FallbackEvent(step=step):
            console.print(f"{t} [yellow]● target[/yellow] {escape(step.text)}")
        case ev.FailedEvent():
            console.print(f"[red]failed: {escape(event.error)}: {escape(event.message)}[/red]")
        case ev.StartedEvent() | ev.FinishedEvent() | ev.DraftedEvent() | ev.RejectedEvent() | ev.CacheHitEvent():
            pass  # the summary tells the end; the rest only with --events
        case _:
            assert_never(event)


def summary(result: ReasoningResult, expected: int | None, console: Console) -> None:
    s = result.stats
    verdict = ""
    if expected is not None:
        ok = result.answer is not None and result.answer.strip() == str(expected)
        verdict = " [green](correct)[/green]" if ok else f" [red](expected {expected})[/red]"
    console.print(f"[bold]Answer: {escape(str(result.answer))}[/bold]{verdict}")
    acc = f"{s.acceptance_rate:.0%}" if s.acceptance_rate is not None else "n/a"
    console.print(
        f"[dim]{len(result.steps)} steps in {s.wall_s:.2f}s, first step {s.time_to_first_step_s or 0:.2f}s, "
        f"acceptance {acc}, target forwards {s.target_forwards}, draft forwards {s.draft_forwards}[/dim]"
    )


# ---------------------------------------------------------------------------------- the target alone
def _alone_config(base: ReasonerConfig, max_steps: int | None = None) -> ReasonerConfig:
    """``base`` without the trajectory cache (the request just filled it), optionally fewer steps."""
    return base.override(cache=False, max_steps=max_steps, lookahead=max_steps)


def _prefill_s(result: ReasoningResult) -> float:
    return sum(s.end_s - s.start_s for s in result.stats.timeline if s.lane == "target" and s.what == "prefill")


class LocalEngine:
    """The models in this process (``--no-daemon``)."""

    def __init__(self, reasoner: Reasoner) -> None:
        self.reasoner = reasoner

    def stream(self, request: Request, method: Method) -> AsyncIterator[Event]:
        return self.reasoner.astream_events(request.image, request.question, method=method)

    async def alone(self, request: Request, max_steps: int | None = None) -> ReasoningResult:
        config = _alone_config(self.reasoner.config, max_steps)
        return await self.reasoner.ainvoke(request.image, request.question, method="target_only", config=config)


async def measure_alone(engine: Engine, request: Request, result: ReasoningResult) -> Comparison:
    """The target alone on the same input, timed whole."""
    alone = await engine.alone(request)
    return Comparison(result.stats.wall_s, alone.stats.wall_s, "measured")


async def estimate_alone(engine: Engine, request: Request, result: ReasoningResult) -> Comparison:
    """The target alone, estimated: its first step timed alone gives its prefill and its cost per token
    (per character, for the token count of the request's own steps); the rest is that cost times
    the length of the steps this request verified."""
    first = await engine.alone(request, 1)
    prefill = _prefill_s(first)
    chars = max(1, len(first.steps[0].text) if first.steps else 1)
    tokens = max(1, first.stats.target_tokens)
    per_token = max(0.0, first.stats.wall_s - prefill) / tokens
    total_tokens = tokens * sum(len(s.text) for s in result.steps) / chars
    how = (
        f"estimate: ~{total_tokens:.0f} tokens at the target's {per_token * 1e3:.1f} ms/token, "
        "timed on its first step; --compare measures it"
    )
    return Comparison(result.stats.wall_s, prefill + total_tokens * per_token, how)


# ---------------------------------------------------------------------------------- the command
def read_request(args: argparse.Namespace, console: Console) -> Request:
    """The image and the question, checked: the first thing the command does."""
    return random_request(args, console) if args.random or args.image is None else file_request(args)


def warn(args: argparse.Namespace, request: Request, console: Console) -> None:
    """A photo or a question outside the demo task, when the demo models will answer it (the task's own warnings)."""
    if uses_demo_models(args):
        from dreamr_stream.tasks import get_task

        for warning in get_task(args.task).off_task_warnings(request.image, request.question):
            console.print(f"[yellow]warning: {escape(warning)}[/yellow]", soft_wrap=True)


def prepare(args: argparse.Namespace, console: Console) -> Request:
    """Everything checked that can be checked before loading a model."""
    request = read_request(args, console)
    check_device(args.device)
    warn(args, request, console)
    return request


async def run(engine: Engine, request: Request, args: argparse.Namespace, console: Console) -> int:
    """Stream the request through ``engine`` and show it; then the comparison with the target alone."""
    from dreamr_stream.events import FailedEvent, FinishedEvent

    result: ReasoningResult | None = None
    async for event in engine.stream(request, args.method):
        show(event, args, console)
        if isinstance(event, FailedEvent):
            return EXIT_FAILED
        if isinstance(event, FinishedEvent):
            result = event.result
            summary(result, request.expected, console)
    if result is None:
        return EXIT_FAILED
    if args.method != "target_only":
        compare = measure_alone if args.compare else estimate_alone
        with console.status("timing the target alone…", spinner="dots"):
            comparison = await compare(engine, request, result)
        console.print(f"[bold]{comparison.line(args.method.upper())}[/bold]", soft_wrap=True)
    return EXIT_OK


def reason_here(args: argparse.Namespace, console: Console) -> int:
    """The models loaded in this process, for this one request (``--no-daemon``)."""
    import anyio

    request = prepare(args, console)
    try:
        reasoner = load(args, console)
    except DreamrError as e:
        console.print(f"[red]{escape(str(e))}[/red]")
        return EXIT_FAILED
    console.print(f"[bold]Q:[/bold] {escape(request.question)}")
    try:
        return anyio.run(run, LocalEngine(reasoner), request, args, console)
    except DreamrError as e:
        console.print(f"[red]{type(e).__name__}: {escape(str(e))}[/red]")
        return EXIT_FAILED
    finally:
        reasoner.close()
