"""dreamr-stream: multimodal speculative reasoning (DREAM-R: FPSR + TBVM) as an async stream.

The names below are imported on first use, so that importing one submodule (a draft's child
process imports ``dreamr_stream.backends``) does not import the whole engine first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dreamr_stream.config import (
        CacheConfig,
        GenerationConfig,
        InputLimits,
        JudgeTemplate,
        ReasonerConfig,
        SchedulingConfig,
        VerificationConfig,
    )
    from dreamr_stream.errors import (
        BackendError,
        ConfigError,
        DreamrError,
        DreamrWarning,
        InputError,
        InvalidImageError,
        InvalidQuestionError,
        ModelLoadError,
        UncalibratedVerificationWarning,
    )
    from dreamr_stream.events import (
        CacheHitEvent,
        DraftedEvent,
        Event,
        EventAdapter,
        FailedEvent,
        FallbackEvent,
        FinishedEvent,
        RejectedEvent,
        StartedEvent,
        VerifiedEvent,
    )
    from dreamr_stream.inputs import ImageInput, check_question, load_image
    from dreamr_stream.reasoner import Method, Reasoner
    from dreamr_stream.store import MemoryTrajectoryStore, TrajectoryStore
    from dreamr_stream.types import LaneSpan, ReasoningResult, ReasoningStats, Step, StepSource, Verdict

# each public name and the module that defines it
_WHERE: dict[str, str] = {
    "BackendError": "dreamr_stream.errors",
    "CacheConfig": "dreamr_stream.config",
    "CacheHitEvent": "dreamr_stream.events",
    "ConfigError": "dreamr_stream.errors",
    "DraftedEvent": "dreamr_stream.events",
    "DreamrError": "dreamr_stream.errors",
    "DreamrWarning": "dreamr_stream.errors",
    "Event": "dreamr_stream.events",
    "EventAdapter": "dreamr_stream.events",
    "FailedEvent": "dreamr_stream.events",
    "FallbackEvent": "dreamr_stream.events",
    "FinishedEvent": "dreamr_stream.events",
    "GenerationConfig": "dreamr_stream.config",
    "ImageInput": "dreamr_stream.inputs",
    "InputError": "dreamr_stream.errors",
    "InputLimits": "dreamr_stream.config",
    "InvalidImageError": "dreamr_stream.errors",
    "InvalidQuestionError": "dreamr_stream.errors",
    "JudgeTemplate": "dreamr_stream.config",
    "LaneSpan": "dreamr_stream.types",
    "MemoryTrajectoryStore": "dreamr_stream.store",
    "Method": "dreamr_stream.reasoner",
    "ModelLoadError": "dreamr_stream.errors",
    "Reasoner": "dreamr_stream.reasoner",
    "ReasonerConfig": "dreamr_stream.config",
    "ReasoningResult": "dreamr_stream.types",
    "ReasoningStats": "dreamr_stream.types",
    "RejectedEvent": "dreamr_stream.events",
    "SchedulingConfig": "dreamr_stream.config",
    "StartedEvent": "dreamr_stream.events",
    "Step": "dreamr_stream.types",
    "StepSource": "dreamr_stream.types",
    "TrajectoryStore": "dreamr_stream.store",
    "UncalibratedVerificationWarning": "dreamr_stream.errors",
    "Verdict": "dreamr_stream.types",
    "VerificationConfig": "dreamr_stream.config",
    "VerifiedEvent": "dreamr_stream.events",
    "check_question": "dreamr_stream.inputs",
    "load_image": "dreamr_stream.inputs",
}

__all__ = [
    "BackendError",
    "CacheConfig",
    "CacheHitEvent",
    "ConfigError",
    "DraftedEvent",
    "DreamrError",
    "DreamrWarning",
    "Event",
    "EventAdapter",
    "FailedEvent",
    "FallbackEvent",
    "FinishedEvent",
    "GenerationConfig",
    "ImageInput",
    "InputError",
    "InputLimits",
    "InvalidImageError",
    "InvalidQuestionError",
    "JudgeTemplate",
    "LaneSpan",
    "MemoryTrajectoryStore",
    "Method",
    "ModelLoadError",
    "Reasoner",
    "ReasonerConfig",
    "ReasoningResult",
    "ReasoningStats",
    "RejectedEvent",
    "SchedulingConfig",
    "StartedEvent",
    "Step",
    "StepSource",
    "TrajectoryStore",
    "UncalibratedVerificationWarning",
    "Verdict",
    "VerificationConfig",
    "VerifiedEvent",
    "check_question",
    "load_image",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dreamr_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
