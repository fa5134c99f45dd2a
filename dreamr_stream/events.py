"""Engine events: a typed union, discriminated by ``type``, that round-trips to JSON."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from dreamr_stream.types import ReasoningResult, Step, Verdict

__all__ = [
    "CacheHitEvent",
    "DraftedEvent",
    "Event",
    "EventAdapter",
    "EventBase",
    "FailedEvent",
    "FallbackEvent",
    "FinishedEvent",
    "RejectedEvent",
    "StartedEvent",
    "VerifiedEvent",
]


class EventBase(BaseModel):
    """What every engine event carries; its subclasses are the members of ``Event``."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")
    elapsed_s: float = Field(default=0.0, ge=0.0, description="seconds since the request started")


class StartedEvent(EventBase):
    type: Literal["started"] = "started"
    question: str
    method: str


class DraftedEvent(EventBase):
    """The draft proposed step ``index`` (not yet verified)."""

    type: Literal["drafted"] = "drafted"
    index: int
    text: str


class VerifiedEvent(EventBase):
    """TBVM accepted a drafted (or cached) step: it is now part of the answer."""

    type: Literal["verified"] = "verified"
    step: Step


class RejectedEvent(EventBase):
    """TBVM rejected a drafted step; a target-written step replaces it."""

    type: Literal["rejected"] = "rejected"
    index: int
    text: str
    verdict: Verdict


class FallbackEvent(EventBase):
    """The target wrote step ``step.index`` itself (after a rejection, or with no draft).

    A repaired step has ``step.kept``: the start of the rejected draft (``step.rejected_draft``)
    that the target kept; the rest of ``step.text`` is its correction. ``step.cost`` says how
    many tokens were kept, checked from the draft's rest, or written, and the forwards spent.
    """

    type: Literal["fallback"] = "fallback"
    step: Step


class CacheHitEvent(EventBase):
    """The trajectory store held steps for this request; they are proposed as drafts."""

    type: Literal["cache_hit"] = "cache_hit"
    steps: int


class FinishedEvent(EventBase):
    type: Literal["finished"] = "finished"
    result: ReasoningResult


class FailedEvent(EventBase):
    type: Literal["failed"] = "failed"
    error: str  # exception class name
    message: str


Event = Annotated[
    Union[
        StartedEvent,
        DraftedEvent,
        VerifiedEvent,
        RejectedEvent,
        FallbackEvent,
        CacheHitEvent,
        FinishedEvent,
        FailedEvent,
    ],
    Field(discriminator="type"),
]
EventAdapter: TypeAdapter[Event] = TypeAdapter(Event)
