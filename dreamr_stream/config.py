"""ReasonerConfig: keyword-only, grouped by concern, validated at construction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dreamr_stream.errors import ConfigError

__all__ = [
    "SERVED_TARGET_SPECULATING",
    "CacheConfig",
    "GenerationConfig",
    "InputLimits",
    "JudgeTemplate",
    "ReasonerConfig",
    "ScheduleRow",
    "SchedulingConfig",
    "VerificationConfig",
]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            # one exception root: callers catch DreamrError; the pydantic detail stays attached
            raise ConfigError(f"invalid {type(self).__name__}: {e}") from e


class JudgeTemplate(_Config):
    """How the target is asked to judge a candidate step.

    The target sees ``<prefix><candidate><delimiter><suffix>`` and we read the next-token
    probabilities of ``positive`` and ``negative``; each must be a single token of the
    target's tokenizer (checked when the backend loads).
    """

    suffix: str = Field(default="Is this step correct? Answer yes or no:", min_length=1)
    positive: str = " yes"
    negative: str = " no"


class GenerationConfig(_Config):
    max_steps: int = Field(default=24, ge=1, le=1024)
    max_step_tokens: int = Field(default=96, ge=1, le=8192)
    step_delimiter: str = Field(default="\n", min_length=1)
    answer_prefix: str = Field(default="Answer:", min_length=1, description="a step starting with it is final")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0 = greedy")
    seed: int = 0

    def is_final(self, text: str, eos: bool = False) -> bool:
        """The one rule for a step that ends the reasoning: the model ended its answer (``eos``)
        or the step starts with ``answer_prefix``. Leading whitespace is ignored, so that a
        model that writes `` Answer: 3`` is not asked for steps after its answer."""
        return eos or text.lstrip().startswith(self.answer_prefix)


class VerificationConfig(_Config):
    mode: Literal["judge", "likelihood"] = "judge"
    tau: float = Field(default=1.0, ge=0.0, description="accept iff p_pos / p_neg >= tau; inf rejects all")
    judge: JudgeTemplate | None = Field(default=None, description="override the target's own judge template")
    likelihood_aggregate: Literal["min", "mean"] = Field(
        default="min", description="likelihood mode: how token log-probs of the candidate are pooled"
    )

    @classmethod
    def recommended(cls, recommendation: Mapping[str, Any], **overrides: Any) -> VerificationConfig:
        """A model folder's recommended settings (``dreamr.json`` "verification"), with explicit
        overrides on top (an override of None keeps the recommendation).

        A folder that measured both modes says so in ``"taus": {"judge": .., "likelihood": ..}``
        (its recommended mode is ``"mode"``); overriding the mode alone then takes that mode's
        measured tau instead of the other mode's."""
        rec = dict(recommendation)
        taus: Mapping[str, float] = rec.pop("taus", {})
        chosen = {k: v for k, v in overrides.items() if v is not None}
        mode = chosen.get("mode", rec.get("mode", "judge"))
        if "tau" not in chosen and mode in taus:
            chosen["tau"] = taus[mode]
        elif "tau" not in chosen and mode != rec.get("mode", "judge"):
            rec.pop("tau", None)  # the recommended tau is the other mode's: a ratio on another scale
        return cls(**{**rec, **chosen})

    @field_validator("tau")
    @classmethod
    def _tau_not_nan(cls, v: float) -> float:
        if math.isnan(v):
            raise ValueError("tau must be a number >= 0 (use float('inf') to reject every draft)")
        return v


# A served target batches requests, so under load its own decoding is cheap per request, while
# a draft computing in one process serves requests one call at a time and each speculative step
# costs the server a verification request: beyond a couple of requests in flight the target
# alone is faster (benchmarks/results/vllm_load_{pinned,shared}.md measure where, on a 2-core CPU).
SERVED_TARGET_SPECULATING = 2


class ScheduleRow(_Config):
    """One row of a speculation schedule: while at most ``in_flight`` requests are in flight,
    the draft may run ``lookahead`` steps ahead (0: the target alone) and, where the target's
    folder measured both TBVM modes, verification uses ``mode`` (None: the request's)."""

    in_flight: int = Field(ge=1, le=1_000_000)
    lookahead: int = Field(ge=0, le=16)
    mode: Literal["judge", "likelihood"] | None = None


class SchedulingConfig(_Config):
    lookahead: int = Field(default=2, ge=1, le=16, description="draft steps allowed ahead of the last verified one")
    fallback: Literal["on", "off", "auto"] = Field(
        default="auto", description="write the target's own step in parallel with verification"
    )
    fallback_chunk_tokens: int = Field(default=4, ge=1, le=256, description="target tokens per fallback model call")
    repair: bool = Field(
        default=True,
        description="repair a rejected step (FPSR and the sequential schedule): the target keeps the start of the "
        "draft it agrees with and checks the draft's rest several tokens per forward (exactly the target's own "
        "step, a fraction of its forwards); False rewrites the whole step (SpecReason's schedule)",
    )
    draft_deadline_s: float | None = Field(
        default=5.0,
        gt=0.0,
        le=600.0,
        description="the longest any one call of the draft may take: a draft is worth something only while it "
        "is faster than the target, so a slower call (a stalled server) sends the request on with the target "
        "alone, and a served draft's circuit breaker counts it, keeping later requests off it. Honoured by served "
        "drafts, whose own deadlines (60 s a step) suit a target; a draft process keeps its call_timeout_s (a "
        "kill there costs a restart). None: the backends' own deadlines",
    )
    max_speculating: int | Literal["auto"] | None = Field(
        default="auto",
        description="load-aware switch: an FPSR request that starts while more than this many requests are in "
        "flight on the Reasoner (itself included) is written by the target alone (None: no limit; auto: no limit "
        "for a target computing in this process, SERVED_TARGET_SPECULATING for a served one)",
    )

    schedule: tuple[ScheduleRow, ...] | None = Field(
        default=None,
        description="how far the draft may run ahead by the requests in flight, row by row (the first row "
        "whose in_flight is at least the load; above the last row, the target alone), read when a request "
        "starts and again at each of its epochs; replaces max_speculating's switch. `dreamr calibrate "
        "--schedule` measures one on the machine it runs on and writes it to the target's dreamr.json",
    )
    min_acceptance: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="below this rolling acceptance of the draft's steps (the Reasoner's last 64 judged), a "
        "request is written by the target alone; every 8th such request still speculates, so that the "
        "acceptance is measured again",
    )

    @field_validator("max_speculating")
    @classmethod
    def _positive(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("max_speculating must be >= 1, 'auto' or None")
        return v

    @field_validator("schedule")
    @classmethod
    def _ordered(cls, rows: tuple[ScheduleRow, ...] | None) -> tuple[ScheduleRow, ...] | None:
        if rows is not None:
            if not rows:
                raise ValueError("a schedule needs at least one row (None: max_speculating's switch)")
            loads = [r.in_flight for r in rows]
            if loads != sorted(set(loads)):
                raise ValueError(f"schedule rows must have increasing in_flight, got {loads}")
        return rows


class CacheConfig(_Config):
    """The trajectory store: verified trajectories reused as drafts, and the verification log."""

    enabled: bool = True
    trust: bool = Field(
        default=False,
        description="yield cached steps without re-verifying them: whoever can write to the store (a shared "
        "Redis) then chooses the answers this Reasoner reports as verified; only for a store you alone write to",
    )
    log: bool = Field(default=True, description="append every verification to the store's log")
    timeout_s: float = Field(default=0.25, gt=0.0, le=30.0, description="per store call; slower is a miss")


class InputLimits(_Config):
    """What a request may send; checked before any model work (``dreamr_stream.inputs``)."""

    max_image_bytes: int = Field(default=20 * 2**20, ge=1)
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="decompression-bomb cap: a larger image is refused, not decoded"
    )
    max_image_side: int = Field(
        default=1024,
        ge=1,
        description="a larger image is downscaled (aspect kept) to this long side before any model work; "
        "1024 is above what the demo models (112 px) and Qwen2-VL-class processors (about 1 M pixels) read",
    )
    min_image_side: int = Field(default=8, ge=1)
    max_question_chars: int = Field(default=2000, ge=1)

    @model_validator(mode="after")
    def _sides(self) -> InputLimits:
        if self.max_image_side < self.min_image_side:
            raise ValueError("max_image_side cannot be below min_image_side")
        return self


class ReasonerConfig(_Config):
    generation: GenerationConfig = GenerationConfig()
    verification: VerificationConfig = VerificationConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    limits: InputLimits = InputLimits()
    cache: CacheConfig = CacheConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ReasonerConfig:
        if self.scheduling.lookahead > self.generation.max_steps:
            raise ValueError("scheduling.lookahead cannot exceed generation.max_steps")
        return self

    def override(
        self,
        *,
        tau: float | None = None,
        mode: Literal["judge", "likelihood"] | None = None,
        max_steps: int | None = None,
        lookahead: int | None = None,
        fallback: Literal["on", "off", "auto"] | None = None,
        repair: bool | None = None,
        cache: bool | None = None,
        **groups: Any,
    ) -> ReasonerConfig:
        """This config with a request's options applied, validated again (``ConfigError``).

        The one way every entry point (the command line, the WebSocket and HTTP servers, the
        LangChain adapters, the bench, the SAPO trainer) applies a user's options: an option of
        None keeps this config's value. ``groups`` replace whole groups or some of their fields
        (``generation={"temperature": 0.5}``; the cache group is switched by ``cache`` alone). A
        ``mode`` without a ``tau`` keeps this config's tau (a model folder's per-mode taus are
        ``VerificationConfig.recommended``'s). A ``max_steps`` below the lookahead lowers the lookahead
        with it: the caller asked for fewer steps, not for an error about how far the draft may
        run ahead (an explicit ``lookahead`` above ``max_steps`` is still an error).
        """
        unknown = set(groups) - (set(type(self).model_fields) - {"cache"})
        if unknown:
            raise ConfigError(
                f"unknown option group(s) {sorted(unknown)}; choose from {sorted(type(self).model_fields)}"
            )
        fields: dict[str, dict[str, Any]] = {
            name: value.model_dump() if isinstance(value, BaseModel) else dict(value) for name, value in groups.items()
        }
        chosen: dict[str, dict[str, Any]] = {
            "verification": {"tau": tau, "mode": mode},
            "generation": {"max_steps": max_steps},
            "scheduling": {"lookahead": lookahead, "fallback": fallback, "repair": repair},
            "cache": {"enabled": cache},
        }
        for name, values in chosen.items():
            fields.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
        if max_steps is not None and lookahead is None and "lookahead" not in fields["scheduling"]:
            fields["scheduling"]["lookahead"] = min(self.scheduling.lookahead, max_steps)
        if not any(fields.values()):
            return self
        merged = {
            name: type(getattr(self, name))(**{**getattr(self, name).model_dump(), **fields.get(name, {})})
            for name in type(self).model_fields
        }
        return ReasonerConfig(**merged)
