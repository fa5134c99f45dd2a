"""dreamr-stream: multimodal speculative reasoning (DREAM-R: FPSR + TBVM) as an async stream."""

from dreamr_stream.config import (
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
from dreamr_stream.events import Event, EventAdapter
from dreamr_stream.reasoner import Method, Reasoner
from dreamr_stream.types import LaneSpan, ReasoningResult, ReasoningStats, Step, StepSource, Verdict

__all__ = [
    "BackendError",
    "ConfigError",
    "DreamrError",
    "Event",
    "EventAdapter",
    "GenerationConfig",
    "InputError",
    "InputLimits",
    "InvalidImageError",
    "InvalidQuestionError",
    "JudgeTemplate",
    "LaneSpan",
    "Method",
    "ModelLoadError",
    "Reasoner",
    "ReasonerConfig",
    "ReasoningResult",
    "ReasoningStats",
    "SchedulingConfig",
    "Step",
    "StepSource",
    "Verdict",
    "VerificationConfig",
]
__version__ = "0.1.0"
