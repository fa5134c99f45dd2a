"""dreamr-stream: multimodal speculative reasoning (DREAM-R: FPSR + TBVM) as an async stream."""

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
    InputError,
    InvalidImageError,
    InvalidQuestionError,
    ModelLoadError,
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

__all__ = [
    "BackendError",
    "CacheConfig",
    "CacheHitEvent",
    "ConfigError",
    "DraftedEvent",
    "DreamrError",
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
    "Verdict",
    "VerificationConfig",
    "VerifiedEvent",
    "check_question",
    "load_image",
]
__version__ = "0.1.0"
