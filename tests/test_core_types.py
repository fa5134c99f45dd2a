"""Types, events and config: validation, JSON round-trips, published schemas."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from dreamr_stream.config import GenerationConfig, ReasonerConfig, SchedulingConfig, VerificationConfig
from dreamr_stream.errors import ConfigError, DreamrError
from dreamr_stream.events import EventAdapter, FinishedEvent, RejectedEvent, VerifiedEvent
from dreamr_stream.types import LaneSpan, ReasoningResult, ReasoningStats, Step, StepSource, Verdict
from dreamr_stream.verify import decide


def sample_result() -> ReasoningResult:
    verdict = decide(0.9, 0.0, math.inf)
    step = Step(index=0, text="Row 1: red circle.", source=StepSource.DRAFT, verdict=verdict, elapsed_s=0.1)
    stats = ReasoningStats(
        draft_steps_judged=1,
        draft_steps_accepted=0,
        steps_by_source={StepSource.DRAFT: 1},
        timeline=[LaneSpan(lane="draft", what="write", step=0, start_s=0.0, end_s=0.05)],
    )
    return ReasoningResult(question="q?", steps=[step], answer=None, stats=stats)


def test_result_round_trips_through_json_with_infinities() -> None:
    result = sample_result()
    text = result.model_dump_json()
    json.loads(text)  # strict JSON: no bare Infinity
    back = ReasoningResult.model_validate_json(text)
    assert back == result
    assert back.steps[0].verdict is not None and back.steps[0].verdict.ratio == math.inf


@pytest.mark.parametrize(
    "event",
    [
        VerifiedEvent(step=sample_result().steps[0], elapsed_s=0.2),
        RejectedEvent(index=1, text="bad", verdict=decide(0.1, 0.9, 1.0)),
        FinishedEvent(result=sample_result()),
    ],
)
def test_events_round_trip_through_the_union(event: object) -> None:
    text = EventAdapter.dump_json(event)  # type: ignore[arg-type]
    assert EventAdapter.validate_json(text) == event


def test_schemas_are_published() -> None:
    schema = EventAdapter.json_schema()
    assert "discriminator" in json.dumps(schema)
    assert ReasonerConfig.model_json_schema()["title"] == "ReasonerConfig"
    assert "p_pos" in Verdict.model_json_schema()["properties"]


def test_acceptance_rate() -> None:
    assert ReasoningStats().acceptance_rate is None
    assert ReasoningStats(draft_steps_judged=4, draft_steps_accepted=3).acceptance_rate == 0.75


@pytest.mark.parametrize(
    "build",
    [
        lambda: VerificationConfig(tau=-1),
        lambda: VerificationConfig(tau=float("nan")),
        lambda: VerificationConfig(mode="vibes"),
        lambda: GenerationConfig(max_steps=0),
        lambda: SchedulingConfig(fallback="sometimes"),
        lambda: ReasonerConfig(generation=GenerationConfig(max_steps=2), scheduling=SchedulingConfig(lookahead=3)),
        lambda: ReasonerConfig(unknown=1),
    ],
)
def test_bad_config_raises_config_error(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        build()
    assert isinstance(info.value, DreamrError) and str(info.value)


def test_one_rule_says_which_step_is_final() -> None:
    """The engine and SAPO ask ``GenerationConfig.is_final``: the end of the answer, or a step
    starting with the answer prefix (leading whitespace aside)."""
    gen = GenerationConfig()
    assert gen.is_final("Answer: 3") and gen.is_final(" Answer: 3") and gen.is_final("3 shapes", eos=True)
    assert not gen.is_final("The Answer: 3") and not gen.is_final("count the red shapes")
    assert GenerationConfig(answer_prefix="So:").is_final("So: 3")


def test_config_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        ReasonerConfig(GenerationConfig())  # type: ignore[misc]
    cfg = ReasonerConfig(verification=VerificationConfig(tau=math.inf))
    assert ReasonerConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        cfg.verification.tau = 2.0  # type: ignore[misc]
