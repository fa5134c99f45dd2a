"""The one place that reads the core's event stream; the Runnable, chat model and tool consume it.

``reason_updates`` turns ``Reasoner.astream_events`` into what LangChain needs:

* one :class:`StepUpdate` per verified step, as soon as it is verified, except that the request's
  last step is held until the ``finished`` event (a few microseconds later) so that it can carry
  the result (answer, statistics): LangChain wants usage and the end marker on the last chunk,
  and "one chunk per step" rules out a trailing empty chunk;
* one :class:`VerdictUpdate` per TBVM decision (accepted or rejected drafts);
* the request's typed error (a ``DreamrError``), and ``TimeoutError`` past the deadline.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, assert_never, cast

import anyio

import dreamr_stream
from dreamr_langchain.types import ImageLike, VerdictEvent
from dreamr_stream import (
    BackendError,
    DreamrError,
    Event,
    Method,
    Reasoner,
    ReasonerConfig,
    ReasoningResult,
    Step,
    Verdict,
)
from dreamr_stream import events as ev

__all__ = ["StepUpdate", "Update", "VerdictUpdate", "reason_updates", "with_generation"]


@dataclass(frozen=True)
class StepUpdate:
    """A verified step; ``result`` is set on the request's last update only.

    ``step`` is None only when a request finishes without any step.
    """

    step: Step | None
    result: ReasoningResult | None = None


@dataclass(frozen=True)
class VerdictUpdate:
    event: VerdictEvent


Update = StepUpdate | VerdictUpdate


def with_generation(base: ReasonerConfig, **changes: Any) -> ReasonerConfig:
    """``base`` with some ``GenerationConfig`` fields replaced, validated again (ConfigError).

    Through ``ReasonerConfig.override``, the one way request options reach a config: a
    ``max_steps`` below the scheduling lookahead lowers the lookahead with it (the caller asked
    for fewer steps, not for a configuration error about how far the draft may run ahead).
    """
    max_steps = changes.pop("max_steps", None)  # by name: override lowers the lookahead with it
    return base.override(max_steps=max_steps, generation=changes)


def _is_last(step: Step, config: ReasonerConfig) -> bool:
    return step.is_final or step.index + 1 >= config.generation.max_steps


def _verdict(index: int, text: str, verdict: Verdict, elapsed_s: float) -> VerdictEvent:
    return VerdictEvent(index=index, text=text, accepted=verdict.accepted, verdict=verdict, elapsed_s=elapsed_s)


def _error(name: str, message: str) -> DreamrError:
    """Rebuild the typed error of a ``failed`` event (it carries the class name and message)."""
    cls = getattr(dreamr_stream, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DreamrError)):
        cls = BackendError
    return cls(message)


async def reason_updates(
    reasoner: Reasoner,
    image: ImageLike,
    question: str,
    *,
    method: Method = "fpsr",
    config: ReasonerConfig | None = None,
    timeout_s: float | None = None,
) -> AsyncGenerator[Update, None]:
    """Updates of one request; closing the generator early cancels the request and its lanes."""
    effective = config or reasoner.config
    deadline = None if timeout_s is None else anyio.current_time() + timeout_s
    held: Step | None = None
    stream = reasoner.astream_events(image, question, method=method, config=config)
    async with aclosing(cast(AsyncGenerator[Event, None], stream)) as events:
        while True:
            try:
                with anyio.fail_after(None if deadline is None else deadline - anyio.current_time()):
                    event = await anext(events)
            except StopAsyncIteration:
                break
            except TimeoutError as e:
                if deadline is not None and anyio.current_time() >= deadline:
                    raise TimeoutError(f"the reasoner did not finish within {timeout_s} s") from e
                raise
            match event:
                case ev.VerifiedEvent(step=step) | ev.FallbackEvent(step=step):
                    if held is not None:  # defensive: a step after the one we took for the last
                        yield StepUpdate(held)
                        held = None
                    if step.verdict is not None:
                        yield VerdictUpdate(_verdict(step.index, step.text, step.verdict, event.elapsed_s))
                    if _is_last(step, effective):
                        held = step
                    else:
                        yield StepUpdate(step)
                case ev.RejectedEvent():
                    yield VerdictUpdate(_verdict(event.index, event.text, event.verdict, event.elapsed_s))
                case ev.FinishedEvent():
                    yield StepUpdate(held, event.result)
                    return
                case ev.FailedEvent():
                    raise _error(event.error, event.message)
                case ev.StartedEvent() | ev.DraftedEvent() | ev.CacheHitEvent():
                    pass  # progress LangChain has no place for: unverified drafts, cache lookups
                case _:
                    assert_never(event)
    raise BackendError("the reasoner's event stream ended without a result")
