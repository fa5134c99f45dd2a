"""The ModelBackend protocol: per-request sessions that own their KV cache.

Text crosses the draft/target boundary, never token ids: the two models may have different
tokenizers. Every method is synchronous and may block; the engine calls them from worker
threads (one limiter per model), never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from PIL import Image

from dreamr_stream.config import JudgeTemplate

__all__ = ["ModelBackend", "ScoreOutput", "Session", "SessionT", "StepOutput"]


@dataclass(frozen=True)
class StepOutput:
    """What one ``generate_step`` call produced.

    ``text`` is the whole step so far (without the delimiter). ``done`` is False only when the
    call's token ``budget`` ran out mid-step; calling again continues the same step.
    """

    text: str
    done: bool
    eos: bool = False
    new_tokens: int = 0
    forwards: int = 0


@dataclass(frozen=True)
class ScoreOutput:
    """Evidence about a candidate step from ONE forward of the judging model.

    The candidate and delimiter tokens (``n_tokens``) stay in the session's cache, as if the
    model had written them; the judge suffix does not. Roll back ``n_tokens`` to reject.
    """

    p_pos: float
    p_neg: float
    token_logprobs: list[float] = field(default_factory=list)  # log p(candidate token | prefix)
    n_tokens: int = 0
    forwards: int = 1


@runtime_checkable
class Session(Protocol):
    """A request's state on one model: the prompt, the steps appended so far, their KV cache."""

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        ...

    @property
    def finished(self) -> bool:
        """The model emitted end-of-sequence."""
        ...


SessionT = TypeVar("SessionT", bound=Session)


@runtime_checkable
class ModelBackend(Protocol[SessionT]):
    """A model that serves per-request sessions of type ``SessionT``."""

    name: str
    judge: JudgeTemplate

    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> SessionT:
        """Prefill image + question once; the session owns its cache."""
        ...

    def generate_step(
        self,
        session: SessionT,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
    ) -> StepOutput:
        """Decode the next reasoning step (or continue a partial one) until ``stop``, EOS or
        ``max_tokens`` step tokens; at most ``budget`` new tokens in this call."""
        ...

    def score(self, session: SessionT, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        """Append ``text + stop`` and, when ``judge`` is given, read the verdict-token
        probabilities after the judge suffix, all in one forward."""
        ...

    def append(self, session: SessionT, text: str, *, stop: str) -> int:
        """Append a step written elsewhere (``text + stop``); returns tokens appended."""
        ...

    def rollback(self, session: SessionT, n_tokens: int) -> None:
        """Drop the last ``n_tokens`` from the cache (and any partial step)."""
        ...

    def fork(self, session: SessionT) -> SessionT:
        """An independent copy of the session (same prefix, own cache)."""
        ...

    def close(self, session: SessionT) -> None:
        """Free the session's memory."""
        ...
