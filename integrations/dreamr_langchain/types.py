"""Values the adapter hands to LangChain: addable stream chunks, custom-event payloads, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypedDict, Union

from PIL import Image
from pydantic import BaseModel, ConfigDict

from dreamr_stream import InputError, InvalidImageError, ReasoningResult, Step, Verdict

__all__ = [
    "VERDICT_EVENT",
    "ImageLike",
    "ImageNotAllowedError",
    "ReasoningChunk",
    "ReasoningInput",
    "ToolStepEvent",
    "UnsupportedContentError",
    "VerdictEvent",
]

#: Name of the custom event (``on_custom_event`` in ``astream_events``) sent for each TBVM verdict.
VERDICT_EVENT = "dreamr_verdict"

#: What the core accepts as an image: raw bytes, base64 / a data URL (a ``str`` is always data),
#: a file as a ``pathlib.Path``, or a PIL image.
ImageLike = Union[bytes, bytearray, memoryview, str, Path, Image.Image]


class ReasoningInput(TypedDict):
    """Input of :class:`~dreamr_langchain.ReasonerRunnable`."""

    image: ImageLike
    question: str


class ReasoningChunk(BaseModel):
    """Verified steps of one request; chunks add up (``+``) to the whole reasoning.

    LangChain builds ``invoke``'s output by summing streamed chunks, so this type must be
    addable: each streamed chunk holds one step; the request's last chunk also carries the
    :class:`~dreamr_stream.ReasoningResult` (answer and statistics); the sum holds them all.
    """

    model_config = ConfigDict(frozen=True)

    steps: tuple[Step, ...] = ()
    result: ReasoningResult | None = None

    def __add__(self, other: object) -> ReasoningChunk:
        if not isinstance(other, ReasoningChunk):
            return NotImplemented
        return ReasoningChunk(steps=self.steps + other.steps, result=other.result or self.result)

    @property
    def answer(self) -> str | None:
        """The final answer, once the last chunk has arrived (None before, or if there is none)."""
        return self.result.answer if self.result is not None else None

    @property
    def text(self) -> str:
        """The steps so far, one per line."""
        return "\n".join(s.text for s in self.steps)


class VerdictEvent(BaseModel):
    """Payload of a ``dreamr_verdict`` custom event: one TBVM decision on a drafted step.

    Rejected drafts never reach the output stream, so this is how a UI or a log sees them.
    """

    model_config = ConfigDict(frozen=True)

    type: Literal["dreamr_verdict"] = "dreamr_verdict"
    index: int
    text: str
    accepted: bool
    verdict: Verdict
    elapsed_s: float = 0.0


class ToolStepEvent(BaseModel):
    """What the agent tool writes to LangGraph's custom stream for each verified step."""

    model_config = ConfigDict(frozen=True)

    type: Literal["dreamr_step"] = "dreamr_step"
    tool: str
    image: str
    step: Step


class UnsupportedContentError(InputError):
    """A chat message holds content the reasoner cannot use (audio, a PDF, a remote URL, ...)."""


class ImageNotAllowedError(InvalidImageError):
    """A tool argument names an image that is neither registered nor under an allowed folder."""
