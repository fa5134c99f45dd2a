"""Per-request state shared by FPSR and the baselines: steps, counts, timeline, events.

It calls no model: the calls a request makes, with their spans and counts, are
``engine.calls``; what to do when is ``engine.request_policy`` and ``engine.policy`` (FPSR)
or a baseline's loop; what the request caches and logs is ``engine.cache``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, asynccontextmanager

from dreamr_stream.backends.call_context import calls_within
from dreamr_stream.config import ReasonerConfig
from dreamr_stream.engine.cache import CacheContext
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.events import Event, FallbackEvent, VerifiedEvent
from dreamr_stream.types import (
    LaneSpan,
    ReasoningResult,
    ReasoningStats,
    SpeculationPlan,
    Step,
    StepCost,
    StepSource,
    Verdict,
)
from dreamr_stream.verify import Verifier

__all__ = ["Emit", "RequestContext", "extract_answer"]

Emit = Callable[[Event], Awaitable[None]]


def extract_answer(text: str, prefix: str) -> str | None:
    idx = text.rfind(prefix)
    return text[idx + len(prefix) :].strip() if idx >= 0 else None


class RequestContext:
    """Everything one request accumulates; lanes report into it, it emits the events."""

    def __init__(
        self,
        *,
        config: ReasonerConfig,
        question: str,
        method: str,
        emit: Emit,
        target: ModelRunner | None,
        draft: ModelRunner | None,
        verifier: Verifier | None = None,
        cache: CacheContext | None = None,
        schedule: SpeculationPlan | None = None,
    ) -> None:
        self.cache = cache
        self.schedule = schedule  # what the speculation schedule chose as the request started
        self.config = config
        self.question = question
        self.method = method
        self._emit = emit
        self.target = target
        self.draft = draft
        self.verifier = verifier
        self.t0 = time.perf_counter()
        self.steps: list[Step] = []
        self.timeline: list[LaneSpan] = []
        self.counts: dict[str, int] = {
            "judged": 0,
            "accepted": 0,
            "target_forwards": 0,
            "draft_forwards": 0,
            "target_tokens": 0,
            "draft_tokens": 0,
        }
        self.first_step_s: float | None = None
        # speculation stopped (draft failure, load): from which step, and why
        self.alone_from: int | None = None
        self.alone_reason: str | None = None

    # ------------------------------------------------------------------ time and events
    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def emit(self, event: Event) -> None:
        await self._emit(event)

    @asynccontextmanager
    async def span(self, lane: str, what: str, step: int) -> AsyncIterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.record_span(lane, what, step, start)

    def record_span(self, lane: str, what: str, step: int, start_s: float) -> None:
        """A span from ``start_s`` to now (for work that no one block of code encloses: a step
        of a streamed rest)."""
        self.timeline.append(LaneSpan(lane=lane, what=what, step=step, start_s=start_s, end_s=self.now()))

    # ------------------------------------------------------------------ counts
    def count(self, runner: ModelRunner, forwards: int, tokens: int = 0) -> None:
        key = "target" if runner is self.target else "draft"
        self.counts[f"{key}_forwards"] += forwards
        self.counts[f"{key}_tokens"] += tokens

    def record_verdict(self, verdict: Verdict, *, index: int, text: str, source: StepSource) -> None:
        """Count a verdict (acceptance is about the draft model's steps) and log it for the store."""
        if source is StepSource.DRAFT:
            self.counts["judged"] += 1
            self.counts["accepted"] += verdict.accepted
        if self.cache is not None:
            prefix = [s.text for s in self.steps]
            self.cache.log_verdict(verdict, index=index, prefix=prefix, text=text, source=source)

    def draft_calls(self) -> AbstractContextManager[None]:
        """Where the draft's calls are made: each within ``scheduling.draft_deadline_s``, since a
        draft slower than that is worth nothing (the backend ends the call itself, so that a
        served draft's breaker counts it: ``backends.call_context``)."""
        return calls_within(self.config.scheduling.draft_deadline_s)

    def go_alone(self, reason: str) -> None:
        """The rest of this request is written by the target alone (said once, in the stats)."""
        if self.alone_reason is None:  # from the target's next step (drafts already judged may still verify)
            self.alone_reason = reason

    @property
    def alone(self) -> bool:
        return self.alone_reason is not None

    # ------------------------------------------------------------------ steps
    def is_final(self, text: str, eos: bool = False) -> bool:
        return self.config.generation.is_final(text, eos)

    def done(self) -> bool:
        return bool(self.steps and self.steps[-1].is_final) or len(self.steps) >= self.config.generation.max_steps

    async def accept(
        self,
        text: str,
        source: StepSource,
        *,
        eos: bool = False,
        verdict: Verdict | None = None,
        rejected_draft: str | None = None,
        kept: str | None = None,
        cost: StepCost | None = None,
    ) -> Step:
        elapsed = self.now()
        step = Step(
            index=len(self.steps),
            text=text,
            source=source,
            verdict=verdict,
            rejected_draft=rejected_draft,
            kept=kept,
            cost=cost,
            is_final=self.is_final(text, eos),
            elapsed_s=elapsed,
        )
        self.steps.append(step)
        if self.alone and self.alone_from is None and source is StepSource.TARGET:
            self.alone_from = step.index
        if rejected_draft is not None and self.cache is not None:
            self.cache.log_target_step(step.index, text)
        if self.first_step_s is None:
            self.first_step_s = elapsed
        event: Event = (
            FallbackEvent(step=step, elapsed_s=elapsed)
            if source is StepSource.TARGET
            else VerifiedEvent(step=step, elapsed_s=elapsed)
        )
        await self.emit(event)
        return step

    def result(self) -> ReasoningResult:
        by_source: dict[StepSource, int] = {}
        for s in self.steps:
            by_source[s.source] = by_source.get(s.source, 0) + 1
        c = self.counts
        stats = ReasoningStats(
            draft_steps_judged=c["judged"],
            draft_steps_accepted=c["accepted"],
            steps_by_source=by_source,
            target_forwards=c["target_forwards"],
            draft_forwards=c["draft_forwards"],
            target_tokens=c["target_tokens"],
            draft_tokens=c["draft_tokens"],
            time_to_first_step_s=self.first_step_s,
            wall_s=self.now(),
            timeline=sorted(self.timeline, key=lambda s: s.start_s),
            steps_repaired=sum(s.kept is not None for s in self.steps),
            target_alone_from=self.alone_from,
            target_alone_reason=self.alone_reason,
            schedule=self.schedule,
        )
        final = self.steps[-1].text if self.steps else ""
        return ReasoningResult(
            question=self.question,
            steps=list(self.steps),
            answer=extract_answer(final, self.config.generation.answer_prefix),
            stats=stats,
            method=self.method,
        )
