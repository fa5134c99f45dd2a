"""OpenAI chat completions, as dreamr streams them: engine events in, chunks out (no I/O).

What we send back, per request (``ChunkWriter``):

* the first chunk: ``delta.role = "assistant"``;
* each step the user sees (a draft step TBVM verified, a cached one, or one the target wrote:
  the ``verified`` and ``fallback`` events) as one chunk whose ``delta.reasoning`` and
  ``delta.reasoning_content`` (the older name, which DeepSeek-style clients read) hold its
  text, preceded by a newline from the second step on, so that the reasoning put together is
  the steps one per line. ``delta.dreamr`` is the WebSocket protocol's message for that event
  (source, verdict with p_pos / p_neg / ratio / tau, kept part, cost, timing), which OpenAI
  clients ignore. With ``drafts: true`` the ``drafted``, ``rejected`` and ``cache_hit`` events
  come too, as chunks with an empty delta and only ``delta.dreamr``;
* the answer in ``delta.content``: the result's ``answer`` (the text after ``Answer:`` in the
  final step, what ``Reasoner.ainvoke`` returns), or the final step's text when the model ended
  without that prefix. The final step is a reasoning step as well: the reasoning is the whole
  verified trajectory, the content the answer alone;
* a chunk with ``finish_reason``: ``stop``, or ``length`` when ``max_tokens`` was reached or the
  steps ran out (``max_steps``) before an answer; its ``delta.dreamr`` is the ``stats`` message;
* with ``stream_options.include_usage``: a last chunk with ``choices: []`` and ``usage``.

A model failure once the stream has started is one ``{"error": {...}}`` object (what vLLM
sends; the openai SDK raises it as ``APIError``); the routes follow it with ``[DONE]``.

Token counts are not a tokenizer's: the steps come from two models with different tokenizers,
a remote server or the cache, and the events carry text. ``count_tokens`` counts the words and
punctuation marks of the text delivered, the same whatever served it. ``completion_tokens`` is
the reasoning's (the steps' text) plus the answer's; ``prompt_tokens`` is the question's text
only (the image and the model's prompt template are not counted). What the models did (tokens
each wrote, forwards) is in the ``stats`` message. ``max_tokens`` bounds ``completion_tokens``
in that unit: the step or answer that would pass it is cut at the limit, the request is
cancelled, and ``finish_reason`` is ``length``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, assert_never

from dreamr_stream.events import (
    CacheHitEvent,
    DraftedEvent,
    Event,
    FailedEvent,
    FallbackEvent,
    FinishedEvent,
    RejectedEvent,
    StartedEvent,
    VerifiedEvent,
)
from dreamr_stream.types import Step
from dreamr_websocket.openai_protocol import OpenAIErrorResponse, error_for
from dreamr_websocket.protocol import from_event

__all__ = ["Chunk", "ChunkWriter", "FinishReason", "count_tokens", "truncate_tokens"]

Chunk = dict[str, Any]  # one JSON object, ready for ``json.dumps``
FinishReason = Literal["stop", "length"]
_TOKEN = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------- tokens
def count_tokens(text: str) -> int:
    """Words and punctuation marks: a count that does not depend on which model wrote the text."""
    return sum(1 for _ in _TOKEN.finditer(text))


def truncate_tokens(text: str, n: int) -> str:
    """``text`` up to the end of its ``n``-th token (``count_tokens``' unit)."""
    if n <= 0:
        return ""
    end = 0
    for i, match in enumerate(_TOKEN.finditer(text)):
        if i == n:
            break
        end = match.end()
    else:
        return text
    return text[:end]


# ---------------------------------------------------------------- responses
def _final_answer(steps: Sequence[Step], answer: str | None) -> str | None:
    """The content: the text after ``Answer:``, else a final step's text; None: no answer came."""
    if answer is not None:
        return answer
    return steps[-1].text if steps and steps[-1].is_final else None


class ChunkWriter:
    """One request's engine events in, its ``chat.completion.chunk`` objects out (no I/O).

    ``feed`` each event and send what it returns; once ``done``, stop the request (close the
    engine's stream): it finished, failed (``error``), or reached ``max_tokens``. The same
    writer gives the non-streamed ``chat.completion`` (``completion()``), so both forms say the
    same thing.
    """

    def __init__(
        self,
        *,
        request_id: str,
        model: str,
        created: int,
        prompt_tokens: int = 0,
        max_tokens: int | None = None,
        include_usage: bool = False,
        drafts: bool = False,
    ) -> None:
        self.id = request_id
        self.model = model
        self.created = created
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.include_usage = include_usage
        self.drafts = drafts
        self.steps: list[Step] = []
        self.reasoning: list[str] = []  # what each step's chunk said
        self.content: str | None = None
        self.reasoning_tokens = 0
        self.content_tokens = 0
        self.stats: dict[str, Any] | None = None  # the WebSocket protocol's ``stats`` message
        self.queue_wait_s = 0.0  # set by the caller once the request has a slot; goes in ``stats``
        self.finish_reason: FinishReason | None = None
        self.error: OpenAIErrorResponse | None = None
        self._started = False

    @property
    def done(self) -> bool:
        """The request has nothing more to say: stop it."""
        return self.finish_reason is not None or self.error is not None

    @property
    def completion_tokens(self) -> int:
        return self.reasoning_tokens + self.content_tokens

    def start(self, dreamr: dict[str, Any] | None = None) -> list[Chunk]:
        """The first chunk (the assistant's role), once; ``dreamr`` e.g. a ``queued`` message."""
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""}, dreamr=dreamr)]

    def feed(self, event: Event) -> list[Chunk]:
        """The chunks for one event (the first chunk too, if not sent yet); none once ``done``."""
        if self.done:
            return []
        return self.start() + self._chunks(event)

    def _chunks(self, event: Event) -> list[Chunk]:
        match event:
            case StartedEvent():
                return []
            case DraftedEvent() | RejectedEvent() | CacheHitEvent():
                return [self._chunk({}, dreamr=self._message(event))] if self.drafts else []
            case VerifiedEvent(step=step) | FallbackEvent(step=step):
                return self._step(step, self._message(event))
            case FinishedEvent(result=result):
                stats = from_event(event, self.id, queue_wait_s=self.queue_wait_s)[-1]
                self.stats = stats.model_dump(mode="json")
                return self._answer(_final_answer(result.steps, result.answer))
            case FailedEvent(error=error, message=message):
                self.error = error_for(error, message)
                return [self.error.body()]
            case _:
                assert_never(event)

    def _message(self, event: Event) -> dict[str, Any]:
        """The WebSocket protocol's message for ``event``: what ``delta.dreamr`` holds."""
        return from_event(event, self.id)[0].model_dump(mode="json")

    def _fit(self, text: str) -> tuple[str, bool]:
        """``text`` within what is left of ``max_tokens``, and whether it had to be cut."""
        if self.max_tokens is None:
            return text, False
        left = self.max_tokens - self.completion_tokens
        return (text, False) if count_tokens(text) <= left else (truncate_tokens(text, left), True)

    def _step(self, step: Step, dreamr: dict[str, Any]) -> list[Chunk]:
        text, cut = self._fit(step.text)
        piece = ("\n" if self.reasoning else "") + text
        self.steps.append(step)
        self.reasoning.append(piece)
        self.reasoning_tokens += count_tokens(text)
        chunks = [self._chunk({"reasoning": piece, "reasoning_content": piece}, dreamr=dreamr)]
        if cut or (self.max_tokens is not None and self.completion_tokens >= self.max_tokens):
            chunks += self._end("length")  # no room left for the answer
        return chunks

    def _answer(self, answer: str | None) -> list[Chunk]:
        if answer is None:  # the steps ran out (max_steps) before an answer
            return self._end("length")
        text, cut = self._fit(answer)
        self.content = text
        self.content_tokens = count_tokens(text)
        chunks = [self._chunk({"content": text})] if text else []
        return chunks + self._end("length" if cut else "stop")

    def _end(self, reason: FinishReason) -> list[Chunk]:
        self.finish_reason = reason
        chunks = [self._chunk({}, dreamr=self.stats, finish_reason=reason)]
        if self.include_usage:
            chunks.append({**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage()})
        return chunks

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object, in ``count_tokens``' unit (see the module's docstring)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def completion(self) -> dict[str, Any]:
        """The whole answer as one ``chat.completion`` (call once ``done`` without ``error``)."""
        reasoning = "".join(self.reasoning) or None
        steps = [s.model_dump(mode="json") for s in self.steps]
        message = {
            "role": "assistant",
            "content": self.content,
            "reasoning": reasoning,
            "reasoning_content": reasoning,
            "dreamr": {"steps": steps, "stats": self.stats},
        }
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason or "stop", "logprobs": None}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage()}

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(
        self, delta: dict[str, Any], *, dreamr: dict[str, Any] | None = None, finish_reason: FinishReason | None = None
    ) -> Chunk:
        if dreamr is not None:
            delta = {**delta, "dreamr": dreamr}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}
