"""Per-request bookkeeping shared by FPSR and the baselines: steps, stats, timeline, events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from dreamr_stream.backends.base import ScoreOutput, Session, StepOutput
from dreamr_stream.config import JudgeTemplate, ReasonerConfig
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.events import Event, FallbackEvent, VerifiedEvent
from dreamr_stream.store import GuardedStore, LogEntry
from dreamr_stream.types import LaneSpan, ReasoningResult, ReasoningStats, Step, StepCost, StepSource, Verdict
from dreamr_stream.verify import Verifier

__all__ = ["CacheContext", "Emit", "RequestContext", "extract_answer", "step_cost"]

Emit = Callable[[Event], Awaitable[None]]
DRAFT_CHUNK_TOKENS = 8  # draft tokens per model call: bounds how long a cancelled lane lingers


def extract_answer(text: str, prefix: str) -> str | None:
    idx = text.rfind(prefix)
    return text[idx + len(prefix) :].strip() if idx >= 0 else None


def step_cost(out: StepOutput, *, kept_tokens: int = 0, extra_forwards: int = 0) -> StepCost:
    """A written step's cost from its ``write_step`` output (plus a begun step's kept tokens)."""
    return StepCost(
        kept_tokens=kept_tokens,
        proposed_tokens=out.proposed,
        written_tokens=out.new_tokens - out.proposed,
        target_forwards=out.forwards + extra_forwards,
    )


class CacheContext:
    """A request's view of the trajectory store: where its trajectory lives, what it logs."""

    def __init__(
        self, store: GuardedStore, *, key: str, image: str, pil: Any, trust: bool, log: bool, timeout_s: float
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.key = key
        self.image = image
        self.pil = pil  # encoded to PNG only when a trajectory is stored
        self.trust = trust
        self.log = log
        self.entries: list[LogEntry] = []


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
    ) -> None:
        self.cache = cache
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
            self.timeline.append(LaneSpan(lane=lane, what=what, step=step, start_s=start, end_s=self.now()))

    # ------------------------------------------------------------------ model calls
    def count(self, runner: ModelRunner, forwards: int, tokens: int = 0) -> None:
        key = "target" if runner is self.target else "draft"
        self.counts[f"{key}_forwards"] += forwards
        self.counts[f"{key}_tokens"] += tokens

    async def open(self, runner: ModelRunner, image: Any, priority: int = 0) -> Session:
        async with self.span(runner.name, "prefill", 0):
            session = await runner.open_session(
                image, self.question, seed=self.config.generation.seed, priority=priority
            )
        self.count(runner, 1)
        return session

    async def write_step(
        self,
        runner: ModelRunner,
        session: Session,
        *,
        index: int,
        lane: str,
        priority: int | Callable[[], int] = 0,
        chunk: int | None = None,
    ) -> StepOutput:
        """Decode one whole step in short calls (so cancellation is prompt); the output counts
        the tokens and forwards of all of them.

        ``priority`` may be a callable, read before every call: a speculative fallback step
        is raised to verification's priority once the engine waits on it.
        """
        gen = self.config.generation
        budget = chunk or DRAFT_CHUNK_TOKENS
        new = forwards = proposed = 0
        async with self.span(lane, "write", index):
            while True:
                out = await runner.generate_step(
                    session,
                    max_tokens=gen.max_step_tokens,
                    stop=gen.step_delimiter,
                    temperature=gen.temperature,
                    budget=budget,
                    priority=priority() if callable(priority) else priority,
                )
                self.count(runner, out.forwards, out.new_tokens)
                new, forwards, proposed = new + out.new_tokens, forwards + out.forwards, proposed + out.proposed
                if out.done:  # the whole step's counts, over all its calls
                    return StepOutput(out.text, True, out.eos, new, forwards, proposed)

    async def judge(
        self, session: Session, text: str, index: int, *, source: StepSource = StepSource.DRAFT
    ) -> tuple[Verdict, ScoreOutput]:
        assert self.target is not None and self.verifier is not None
        judge: JudgeTemplate | None = None
        if self.verifier.needs_judge:
            judge = self.config.verification.judge or self.target.backend.judge
        async with self.span("verify", "judge", index):
            score = await self.target.score(session, text, stop=self.config.generation.step_delimiter, judge=judge)
        self.count(self.target, score.forwards)
        verdict = self.verifier.verify(score.p_pos, score.p_neg, score.token_logprobs)
        if source is StepSource.DRAFT:  # acceptance rate is about the draft model's steps
            self.counts["judged"] += 1
            self.counts["accepted"] += verdict.accepted
        if self.cache is not None and self.cache.log:
            self.cache.entries.append(
                LogEntry(
                    key=self.cache.key,
                    image=self.cache.image,
                    question=self.question,
                    index=index,
                    prefix=[s.text for s in self.steps],
                    draft=text,
                    verdict=verdict,
                    source=source.value,
                )
            )
        return verdict, score

    def go_alone(self, reason: str) -> None:
        """The rest of this request is written by the target alone (said once, in the stats)."""
        if self.alone_from is None:
            self.alone_from, self.alone_reason = len(self.steps), reason

    @property
    def alone(self) -> bool:
        return self.alone_from is not None

    async def write_alone(self, runner: ModelRunner, session: Session, source: StepSource) -> None:
        """Write the remaining steps with one model alone on ``session`` (the single-model
        baselines, and FPSR once speculation stopped)."""
        while not self.done():
            out = await self.write_step(runner, session, index=len(self.steps), lane=runner.name)
            cost = step_cost(out) if source is StepSource.TARGET else None
            await self.accept(out.text, source, eos=out.eos, cost=cost)

    async def target_alone(self, session: Session) -> None:
        """Write the remaining steps with the target alone on ``session``."""
        assert self.target is not None
        await self.write_alone(self.target, session, StepSource.TARGET)

    # ------------------------------------------------------------------ steps
    def is_final(self, text: str, eos: bool) -> bool:
        return eos or text.lstrip().startswith(self.config.generation.answer_prefix)

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
        entries = self.cache.entries if self.cache is not None else []
        if rejected_draft is not None and entries and entries[-1].index == step.index:
            entries[-1] = entries[-1].model_copy(update={"target_step": text})
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
        )
        final = self.steps[-1].text if self.steps else ""
        return ReasoningResult(
            question=self.question,
            steps=list(self.steps),
            answer=extract_answer(final, self.config.generation.answer_prefix),
            stats=stats,
            method=self.method,
        )
