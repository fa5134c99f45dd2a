"""``abuse.py``'s ``vllm_stopped``: a real vLLM server (``dreamr_vllm.VLLMServer``, in its own
venv) serving the shipped draft, and one serving the shipped target, each stopped (SIGSTOP of
its process group: the API server and its engine) mid-request, then continued (SIGCONT).

The venv is never built here (``dreamr_vllm.ensure_venv`` downloads some 3.4 GB): without one,
the attack reports that it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

from abuse_outcome import Outcome, timed
from serve_process import ROOT

from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import CacheConfig
from dreamr_stream.events import Event, FailedEvent, FinishedEvent, StartedEvent
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.tasks import get_task, items
from dreamr_stream.types import ReasoningResult

DEFAULT_VENV = Path(os.environ.get("DREAMR_VLLM_VENV", ROOT / ".venv-vllm"))


def signal_group(server: Any, sig: int) -> None:
    """``sig`` to the server's process group (it starts in a session of its own)."""
    if server.process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, sig)


async def attempt(work: Awaitable[ReasoningResult], limit_s: float) -> tuple[ReasoningResult | None, str, float]:
    """(the result or None, how it ended, seconds): ``target alone (why)``, ``with the draft``,
    ``no answer`` within ``limit_s``, or the error raised."""
    t0 = time.monotonic()
    try:
        result, _ = await timed(work, limit_s)
    except Exception as e:  # the outcome wanted from a stopped target: a clear error
        return None, f"{type(e).__name__}: {e}", time.monotonic() - t0
    if result is None:
        return None, "no answer", time.monotonic() - t0
    why = result.stats.target_alone_reason
    return result, f"target alone ({why})" if why else "with the draft", time.monotonic() - t0


class Failed(Exception):
    """A request that ended with a ``FailedEvent``: its error's class name and message."""


async def stopped_as_it_starts(reasoner: Reasoner, item: Any, server: Any) -> ReasoningResult:
    """A request whose model server is stopped (SIGSTOP) as the request starts; its result."""
    stream = cast(AsyncGenerator[Event, None], reasoner.astream_events(item.image, item.question))
    async with aclosing(stream) as events:
        async for event in events:
            if isinstance(event, StartedEvent):
                signal_group(server, signal.SIGSTOP)
            elif isinstance(event, FinishedEvent):
                return event.result
            elif isinstance(event, FailedEvent):
                raise Failed(f"{event.error}: {event.message}")
    raise Failed("the stream ended without a result")


async def stopped_then_continued(
    reasoner: Reasoner, server: Any, args: argparse.Namespace, *, draft: bool
) -> dict[str, Any]:
    """One request that the server's stop catches mid-way, ``--later-requests`` more while it is
    stopped, then requests after SIGCONT until one is served by it again (``draft``: one that
    used the draft; else any answer)."""
    item = next(items(get_task(), "test", 1, start=74_000))
    reasoner.config = reasoner.config.model_copy(update={"cache": CacheConfig(enabled=False)})

    def ask() -> Awaitable[ReasoningResult]:
        return reasoner.ainvoke(item.image, item.question)

    _, warm_how, warm_s = await attempt(ask(), args.deadline_s)
    runs = [await attempt(stopped_as_it_starts(reasoner, item, server), args.deadline_s)]
    runs += [await attempt(ask(), args.deadline_s) for _ in range(args.later_requests)]
    signal_group(server, signal.SIGCONT)
    t0, back = time.monotonic(), None
    while back is None and time.monotonic() - t0 < args.deadline_s:
        result, how, _ = await attempt(ask(), max(1.0, args.deadline_s - (time.monotonic() - t0)))
        served = how == "with the draft" if draft else result is not None
        back = time.monotonic() - t0 if served else None
        await asyncio.sleep(0 if back is not None else 0.5)
    return {"warm": (warm_how, warm_s), "stopped": [(how, s) for _, how, s in runs], "back_s": back}


async def vllm_stopped(args: argparse.Namespace) -> Outcome:
    python = args.vllm_venv / "bin" / "python"
    if not python.exists():
        return Outcome(False, f"not run: no vLLM venv at {args.vllm_venv}", problems=["no vLLM venv (--vllm-venv)"])
    from dreamr_vllm import VLLMServer

    paths = demo_paths("sapo")
    with tempfile.TemporaryDirectory(prefix="dreamr-abuse-") as tmp:
        draft_server = VLLMServer(python, paths.draft, name="draft", log_path=Path(tmp, "draft.log"))
        target_server = VLLMServer(python, paths.target, name="target", log_path=Path(tmp, "target.log"))
        try:
            t0 = time.monotonic()
            await asyncio.gather(asyncio.to_thread(draft_server.start), asyncio.to_thread(target_server.start))
            start_s = time.monotonic() - t0
            with_draft = Reasoner.from_pretrained(target=paths.target, draft=draft_server.url, device="cpu")
            try:
                draft = await stopped_then_continued(with_draft, draft_server, args, draft=True)
            finally:
                with_draft.close()
            with_target = Reasoner.from_pretrained(
                target=target_server.url,
                draft=paths.draft,
                device="cpu",
                draft_process=False,
                settings_from=paths.target,
            )
            try:
                target = await stopped_then_continued(with_target, target_server, args, draft=False)
            finally:
                with_target.close()
        finally:
            for server in (draft_server, target_server):
                signal_group(server, signal.SIGCONT)
                server.stop()
    return verdict(draft, target, draft_server.url, target_server.url, start_s, args)


def verdict(
    draft: dict[str, Any], target: dict[str, Any], draft_url: str, target_url: str, start_s: float, args: Any
) -> Outcome:
    limit = args.deadline_s
    problems = [
        f"the draft's server stopped: {how} after {s:.1f} s"
        for how, s in draft["stopped"]
        if not how.startswith("target alone")
    ]
    problems += [
        f"the target's server stopped: {how[:200]} after {s:.1f} s"
        for how, s in target["stopped"]
        if target_url not in how or s > limit
    ]
    for name, part in (("draft", draft), ("target", target)):
        if part["back_s"] is None:
            problems.append(f"the {name}'s server continued: not served by it again within {limit:g} s")

    def text(part: dict[str, Any]) -> str:
        stopped = ", ".join(f"{how[:160]} in {s:.1f} s" for how, s in part["stopped"])
        back = "never" if part["back_s"] is None else f"after {part['back_s']:.1f} s"
        return f"while stopped: {stopped}; continued: served by it again {back}"

    return Outcome(
        held=not problems,
        measured=f"servers up in {start_s:.0f} s. Draft's server ({draft_url}) {text(draft)}. Target's server "
        f"({target_url}) {text(target)}",
        numbers={"start_s": round(start_s, 1), "deadline_s": limit, "draft": draft, "target": target},
        problems=problems,
    )
