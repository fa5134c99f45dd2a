"""``ChatDreamr``: the reasoner as a LangChain chat model, one ``AIMessageChunk`` per verified step.

A HumanMessage carries the image (a standard image content block) and the question. The reply is
what LangChain 1.x expects of a reasoning model:

* each verified step is reasoning, not text: ``message.content_blocks`` lists one standard
  ``{"type": "reasoning", "reasoning": step, "extras": {"source", "verdict", "timing"}}`` block
  per step (``output_version="v1"`` stores those blocks in ``content``); older readers find the
  steps joined by newlines in ``additional_kwargs["reasoning_content"]``, and every step's full
  record (TBVM verdict, the draft it replaced) is in ``additional_kwargs["dreamr_steps"]``;
* the answer is the text (``message.text``, and ``content`` by default), on the last chunk, which
  also carries ``usage_metadata``, ``finish_reason`` and the request's statistics.

The streamed chunks add up to the message that ``invoke`` returns.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, get_args

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage, UsageMetadata
from langchain_core.messages.block_translators import register_translator
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, field_validator

from dreamr_langchain._bridge import iterate_sync
from dreamr_langchain._updates import StepUpdate, reason_updates, with_generation
from dreamr_langchain.messages import STEPS_KEY, parse_messages, reply_blocks, reply_chunk_blocks
from dreamr_stream import Method, Reasoner, ReasonerConfig, ReasoningResult, Step

__all__ = ["MODEL_NAMES", "ChatDreamr"]

log = logging.getLogger(__name__)
#: ``model`` names: the reasoning method to run, e.g. ``"dreamr-fpsr"`` or ``"dreamr-target_only"``.
MODEL_NAMES: dict[str, Method] = {f"dreamr-{m}": m for m in get_args(Method)}
_CALL_OPTIONS = frozenset({"model", "temperature", "max_tokens", "max_steps", "timeout", "image", "stream"})
PROVIDER = "dreamr"
# ``content_blocks`` of a message whose response_metadata names this provider reads its steps as
# reasoning blocks (and ``output_version="v1"`` writes those blocks into ``content``)
register_translator(PROVIDER, reply_blocks, reply_chunk_blocks)


@functools.cache
def _shared_demo() -> Reasoner:
    """One process-wide demo reasoner for models built without one (loading takes seconds)."""
    log.info("ChatDreamr: no reasoner given, loading the shipped demo models")
    return Reasoner.demo()


def _method(model: str) -> Method:
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODEL_NAMES)}")
    return MODEL_NAMES[model]


@dataclass
class StepChunker:
    """Turns step updates into message chunks (pure): reasoning, stop sequences, the answer, the last chunk."""

    model_name: str
    stops: Sequence[str]
    emitted: str = ""
    steps: int = 0
    last_elapsed_s: float = 0.0
    done: bool = field(default=False, init=False)

    def chunk(self, update: StepUpdate) -> ChatGenerationChunk:
        step, result = update.step, update.result
        reasoning = "" if step is None else ("\n" if self.steps else "") + step.text  # steps joined by newlines
        self.steps += step is not None
        reasoning, hit = self._cut(reasoning)
        self.emitted += reasoning
        last = hit is not None or result is not None
        extra: dict[str, Any] = {}
        if step is not None:
            extra = {"reasoning_content": reasoning, STEPS_KEY: [self._record(step)]}
        answer = result.answer if result is not None and hit is None and result.answer is not None else ""
        message = AIMessageChunk(
            content=answer,
            additional_kwargs=extra,
            response_metadata=self._final_metadata(step, result, hit) if last else {"model_provider": PROVIDER},
            usage_metadata=_usage(result) if result is not None else None,
            chunk_position="last" if last else None,
        )
        self.done = last
        return ChatGenerationChunk(message=message)

    def _record(self, step: Step) -> dict[str, Any]:
        """The step as JSON, with ``step_s``: seconds since the previous step (or the request's start)."""
        step_s = max(0.0, step.elapsed_s - self.last_elapsed_s)
        self.last_elapsed_s = step.elapsed_s
        return {**step.model_dump(mode="json"), "step_s": round(step_s, 6)}

    def _cut(self, content: str) -> tuple[str, str | None]:
        """``content`` up to the first stop sequence in the whole reasoning, and that sequence."""
        text = self.emitted + content
        found = [(text.find(s, max(0, len(self.emitted) - len(s) + 1)), s) for s in self.stops if s]
        hits = sorted((i, s) for i, s in found if i >= 0)
        if not hits:
            return content, None
        at, stop = hits[0]
        return text[len(self.emitted) : max(at, len(self.emitted))], stop

    def _final_metadata(self, step: Step | None, result: ReasoningResult | None, hit: str | None) -> dict[str, Any]:
        reason = "stop" if hit is not None or (step is not None and step.is_final) else "length"
        meta: dict[str, Any] = {"model_name": self.model_name, "model_provider": PROVIDER, "finish_reason": reason}
        if hit is not None:
            meta["stop_sequence"] = hit
        if result is not None:
            meta["answer"] = result.answer
            meta["dreamr_stats"] = result.stats.model_dump(mode="json", exclude={"timeline"})
        return meta


def _usage(result: ReasoningResult) -> UsageMetadata:
    """Tokens decoded by both models (drafts, fallbacks and all); the core reports no prompt length yet."""
    out = result.stats.target_tokens + result.stats.draft_tokens
    return UsageMetadata(input_tokens=0, output_tokens=out, total_tokens=out)


class ChatDreamr(BaseChatModel):
    """A chat model that answers a question about an image by speculative step-by-step reasoning.

    >>> chat = ChatDreamr(reasoner=Reasoner.demo())
    >>> msg = HumanMessage(content=[
    ...     {"type": "text", "text": "How many circles are there?"},
    ...     {"type": "image", "base64": b64_png, "mime_type": "image/png"},
    ... ])
    >>> for chunk in chat.stream([msg]):
    ...     for block in chunk.content_blocks:
    ...         print(block["type"], block.get("reasoning") or block.get("text"))

    ``model`` picks the method (:data:`MODEL_NAMES`). Parameters map onto the reasoner's
    ``GenerationConfig``: ``temperature``; ``max_tokens`` caps each *step*
    (``max_step_tokens``; the reasoner has no total cap, use ``max_steps``). ``stop`` sequences
    end the stream where they first appear (the request is cancelled there). ``timeout`` bounds
    a request (``TimeoutError``). ``default_image`` is used when the messages carry no image.
    Tool calling and structured output are not supported: the models only write reasoning steps.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    reasoner: Reasoner | None = Field(default=None, exclude=True)
    """The reasoner to run; None: the shipped demo models, loaded once per process on first use."""
    model_name: str = Field(default="dreamr-fpsr", alias="model")
    reasoner_config: ReasonerConfig | None = Field(default=None, exclude=True)
    """Base configuration per request (default: the reasoner's own); the fields below override it."""
    temperature: float | None = None
    max_tokens: int | None = None
    max_steps: int | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    default_image: Any = Field(default=None, exclude=True)
    """Image for conversations that carry none (bytes, base64, a pathlib.Path or a PIL image)."""

    @field_validator("model_name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        _method(value)
        return value

    # ------------------------------------------------------------------ LangChain metadata
    @property
    def _llm_type(self) -> str:
        return "dreamr-chat"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        keys = ("model_name", "temperature", "max_tokens", "max_steps", "stop", "timeout")
        return {k: getattr(self, k) for k in keys}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="dreamr",
            ls_model_name=model if isinstance(model, str) else self.model_name,
            ls_model_type="chat",
        )
        if (temperature := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = temperature
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stops := self._stops(stop):
            params["ls_stop"] = stops
        return params

    # ------------------------------------------------------------------ requests
    def _stops(self, stop: list[str] | None) -> list[str]:
        return [*(self.stop or []), *(stop or [])]

    def _call(self, reasoner: Reasoner, kwargs: Mapping[str, Any]) -> tuple[str, ReasonerConfig | None]:
        """The model name and per-request config of one call (ValueError / ConfigError when invalid)."""
        model = kwargs.get("model") or self.model_name
        _method(model)
        changes = {
            "temperature": kwargs.get("temperature", self.temperature),
            "max_step_tokens": kwargs.get("max_tokens", self.max_tokens),
            "max_steps": kwargs.get("max_steps", self.max_steps),
        }
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return model, self.reasoner_config
        return model, with_generation(self.reasoner_config or reasoner.config, **changes)

    async def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> AsyncGenerator[ChatGenerationChunk, None]:
        unknown = set(kwargs) - _CALL_OPTIONS
        if unknown:
            raise TypeError(f"ChatDreamr got unexpected keyword argument(s) {sorted(unknown)}")
        request = parse_messages(messages, kwargs.get("image", self.default_image))
        reasoner = self.reasoner if self.reasoner is not None else await asyncio.to_thread(_shared_demo)
        model, config = self._call(reasoner, kwargs)
        chunker = StepChunker(model_name=model, stops=self._stops(stop))
        updates = reason_updates(
            reasoner,
            request.image,
            request.question,
            method=_method(model),
            config=config,
            timeout_s=kwargs.get("timeout", self.timeout),
        )
        async with aclosing(updates):  # leaving early (a stop sequence, a closed stream) cancels the request
            async for update in updates:
                if isinstance(update, StepUpdate):
                    yield chunker.chunk(update)
                    if chunker.done:
                        return

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async with aclosing(self._chunks(messages, stop, kwargs)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from iterate_sync(lambda: self._chunks(messages, stop, kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
