"""Core value types: verdicts, steps, results and their statistics (pydantic v2, JSON round-trip)."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

__all__ = [
    "LaneSpan",
    "ReasoningResult",
    "ReasoningStats",
    "SpeculationPlan",
    "Step",
    "StepCost",
    "StepSource",
    "Verdict",
]


def _finite_or_str(x: float) -> float | str:
    # JSON has no infinity; keep it readable and round-trippable ("inf" parses back as float)
    return x if math.isfinite(x) else str(x)


Ratio = Annotated[float, PlainSerializer(_finite_or_str, when_used="json")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")


class StepSource(StrEnum):
    """Who wrote a verified step."""

    DRAFT = "draft"  # drafted by the small model, accepted by TBVM
    TARGET = "target"  # written by the target (fallback after a rejection, or target-only)
    CACHE = "cache"  # taken from the trajectory store


class Verdict(_Model):
    """A TBVM decision with its evidence: accept iff ``ratio >= tau``."""

    p_pos: float = Field(ge=0.0, le=1.0, description="probability of the positive verdict token")
    p_neg: float = Field(ge=0.0, le=1.0, description="probability of the negative verdict token")
    ratio: Ratio = Field(ge=0.0, description="p_pos / p_neg (inf when p_neg == 0)")
    tau: Ratio = Field(ge=0.0, description="acceptance threshold on the ratio")
    accepted: bool
    mode: str = Field(default="judge", description="'judge' (verdict tokens) or 'likelihood'")


class StepCost(_Model):
    """What a target-written step cost the target: how much of it came for free.

    A rejected draft step is repaired: the target keeps the draft's start that is its own greedy
    choice (``kept_tokens``, no forward beyond the one feeding them), checks the draft's rest
    several tokens per forward (``proposed_tokens``) and decodes the remainder one token per
    forward (``written_tokens``). Writing the step whole would take about one forward per token.
    """

    kept_tokens: int = Field(default=0, ge=0)
    proposed_tokens: int = Field(default=0, ge=0)
    written_tokens: int = Field(default=0, ge=0)
    target_forwards: int = Field(default=0, ge=0, description="forwards after the verdict, to finish the step")

    @property
    def tokens(self) -> int:
        return self.kept_tokens + self.proposed_tokens + self.written_tokens


class Step(_Model):
    """One verified reasoning step, as the user sees it."""

    index: int = Field(ge=0)
    text: str
    source: StepSource
    verdict: Verdict | None = Field(default=None, description="TBVM verdict; None for target-written steps")
    rejected_draft: str | None = Field(default=None, description="the draft this step replaced, if any")
    kept: str | None = Field(
        default=None,
        description="a repaired step: the start of the rejected draft that the target kept (its own greedy "
        "prefix); the rest of the text the target wrote",
    )
    cost: StepCost | None = Field(default=None, description="a target-written step's cost to the target")
    is_final: bool = False
    elapsed_s: float = Field(default=0.0, ge=0.0, description="seconds since the request started")


class LaneSpan(_Model):
    """One unit of work on one lane, for timelines: [start_s, end_s) since request start."""

    lane: str  # "draft" | "verify" | "target"
    what: str
    step: int
    start_s: float
    end_s: float


class SpeculationPlan(_Model):
    """What the schedule chose for a request (``engine.schedule``), and from what."""

    in_flight: int = Field(description="requests in flight on the Reasoner when it chose, this one included")
    acceptance: float | None = Field(default=None, description="the rolling acceptance it saw (None: none yet)")
    lookahead: int = Field(description="how far the draft may run ahead; 0: the target alone")
    mode: str | None = Field(default=None, description="the TBVM mode the schedule chose (None: the request's)")
    reason: str = Field(description="which rule chose it")


class ReasoningStats(_Model):
    draft_steps_judged: int = 0
    draft_steps_accepted: int = 0
    steps_by_source: dict[StepSource, int] = Field(default_factory=dict)
    target_forwards: int = 0
    draft_forwards: int = 0
    target_tokens: int = 0
    draft_tokens: int = 0
    time_to_first_step_s: float | None = None
    wall_s: float = 0.0
    timeline: list[LaneSpan] = Field(default_factory=list)
    steps_repaired: int = Field(default=0, description="target steps continued from a rejected draft's start")
    target_alone_from: int | None = Field(
        default=None, description="a speculative request went on with the target alone from this step"
    )
    target_alone_reason: str | None = Field(
        default=None, description="why: the draft failed (its error), or the load-aware switch (the load seen)"
    )
    schedule: SpeculationPlan | None = Field(
        default=None, description="FPSR: what the speculation schedule chose when the request started"
    )

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft steps / draft steps judged (None when nothing was judged)."""
        if self.draft_steps_judged == 0:
            return None
        return self.draft_steps_accepted / self.draft_steps_judged


class ReasoningResult(_Model):
    question: str
    steps: list[Step]
    answer: str | None = Field(description="the text after 'Answer:' in the final step, if any")
    stats: ReasoningStats
    method: str = "fpsr"

    @property
    def text(self) -> str:
        return "\n".join(s.text for s in self.steps)
