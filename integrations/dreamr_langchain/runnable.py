"""``ReasonerRunnable``: the reasoner as a LangChain Runnable that streams verified steps.

Input ``{"image": ..., "question": ...}``; output :class:`ReasoningChunk`, one per verified step.
Everything LangChain layers on top (``invoke`` as the sum of the stream, ``batch``,
``astream_events``, callbacks, tags, run names) comes from the two stream helpers of the base
class, so tracing sees one chain run per request whichever entry point was used.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from contextlib import aclosing, closing
from typing import Any, cast

from langchain_core.callbacks import (
    AsyncCallbackManagerForChainRun,
    CallbackManagerForChainRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel, ConfigDict, Field

from dreamr_langchain._bridge import iterate_sync
from dreamr_langchain._updates import StepUpdate, VerdictUpdate, reason_updates
from dreamr_langchain.types import VERDICT_EVENT, ImageLike, ReasoningChunk, ReasoningInput
from dreamr_stream import InputError, InvalidImageError, InvalidQuestionError, Method, Reasoner, ReasonerConfig

__all__ = ["ReasonerRunnable"]

_OPTIONS = frozenset({"method", "reasoner_config", "timeout_s"})


class _InputSchema(BaseModel):
    """JSON schema of the input (the TypedDict's image union includes PIL images, which have none)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Any = Field(description="image bytes, base64 or a data URL, a pathlib.Path (never a str), or a PIL image")
    question: str = Field(description="the question about the image")


class ReasonerRunnable(Runnable[ReasoningInput, ReasoningChunk]):
    """Stream a :class:`~dreamr_stream.Reasoner`'s verified steps through LangChain.

    >>> chain = ReasonerRunnable(Reasoner.demo())
    >>> async for chunk in chain.astream({"image": Path("puzzle.png"), "question": "How many circles?"}):
    ...     print(chunk.steps[0].text)
    >>> chain.invoke({...}).answer          # the sum of the chunks: every step, plus the result

    Per call (keyword arguments, or ``.bind(...)``): ``method``, ``reasoner_config`` and
    ``timeout_s`` override the constructor's values. Each TBVM verdict, accepted or not, is sent
    as a ``dreamr_verdict`` custom event (:class:`~dreamr_langchain.VerdictEvent`).
    Sync calls (``invoke``, ``stream``, ``batch``) work inside a running event loop too.
    """

    def __init__(
        self,
        reasoner: Reasoner,
        *,
        method: Method = "fpsr",
        reasoner_config: ReasonerConfig | None = None,
        timeout_s: float | None = None,
        name: str | None = None,
    ) -> None:
        self.reasoner = reasoner
        self.method: Method = method
        self.reasoner_config = reasoner_config
        self.timeout_s = timeout_s
        self.name = name or "DreamrReasoner"

    # ------------------------------------------------------------------ schema
    def get_input_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return _InputSchema

    # ------------------------------------------------------------------ request plumbing
    def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - _OPTIONS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; allowed: {sorted(_OPTIONS)}")
        return {
            "method": kwargs.get("method", self.method),
            "config": kwargs.get("reasoner_config", self.reasoner_config),
            "timeout_s": kwargs.get("timeout_s", self.timeout_s),
        }

    @staticmethod
    def _request(inputs: list[Any]) -> tuple[ImageLike, str]:
        """The one ``{image, question}`` input of a request, checked for shape (values: by the core)."""
        if len(inputs) != 1:
            raise InputError(f"ReasonerRunnable takes exactly one input per request, got {len(inputs)}")
        value = inputs[0]
        if not isinstance(value, Mapping):
            raise InputError(
                f'the input must be a mapping {{"image": ..., "question": ...}}, not {type(value).__name__}'
            )
        if value.get("image") is None:
            raise InvalidImageError('the input has no "image"')
        if "question" not in value:
            raise InvalidQuestionError('the input has no "question"')
        return cast(ImageLike, value["image"]), value["question"]

    # ------------------------------------------------------------------ async
    async def _atransform(
        self, inputs: AsyncIterator[ReasoningInput], config: RunnableConfig, options: dict[str, Any]
    ) -> AsyncIterator[ReasoningChunk]:
        image, question = self._request([i async for i in inputs])
        # aclosing: when LangChain closes this generator early, the request must be closed (and
        # its lanes cancelled and awaited) now, not whenever the garbage collector gets to it
        async with aclosing(reason_updates(self.reasoner, image, question, **options)) as updates:
            async for update in updates:
                if isinstance(update, VerdictUpdate):
                    await adispatch_custom_event(VERDICT_EVENT, update.event, config=config)
                else:
                    yield _chunk(update)

    async def astream(
        self, input: ReasoningInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncGenerator[ReasoningChunk, None]:
        """Chunks as steps are verified; wrap in ``contextlib.aclosing`` to leave early deterministically."""
        options = self._options(kwargs)

        async def one() -> AsyncIterator[ReasoningInput]:
            yield input

        def transform(
            inputs: AsyncIterator[ReasoningInput], run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
        ) -> AsyncIterator[ReasoningChunk]:
            return self._atransform(inputs, config, options)

        stream = self._atransform_stream_with_config(one(), transform, config)
        async with aclosing(cast(AsyncGenerator[ReasoningChunk, None], stream)):
            async for chunk in stream:
                yield chunk

    async def ainvoke(
        self, input: ReasoningInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> ReasoningChunk:
        total = ReasoningChunk()
        async for chunk in self.astream(input, config, **kwargs):  # runs to the end: nothing to close early
            total = total + chunk
        return total

    # ------------------------------------------------------------------ sync
    def _transform(
        self, inputs: Iterator[ReasoningInput], config: RunnableConfig, options: dict[str, Any]
    ) -> Iterator[ReasoningChunk]:
        image, question = self._request(list(inputs))
        updates = iterate_sync(lambda: reason_updates(self.reasoner, image, question, **options), self.reasoner)
        with closing(updates):
            for update in updates:
                if isinstance(update, VerdictUpdate):
                    dispatch_custom_event(VERDICT_EVENT, update.event, config=config)
                else:
                    yield _chunk(update)

    def stream(
        self, input: ReasoningInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Generator[ReasoningChunk, None, None]:
        """Sync ``astream`` (any thread, with or without a running loop); ``close()`` cancels the request."""
        options = self._options(kwargs)

        def transform(
            inputs: Iterator[ReasoningInput], run_manager: CallbackManagerForChainRun, config: RunnableConfig
        ) -> Iterator[ReasoningChunk]:
            return self._transform(inputs, config, options)

        yield from self._transform_stream_with_config(iter([input]), transform, config)

    def invoke(self, input: ReasoningInput, config: RunnableConfig | None = None, **kwargs: Any) -> ReasoningChunk:
        total = ReasoningChunk()
        for chunk in self.stream(input, config, **kwargs):
            total = total + chunk
        return total


def _chunk(update: StepUpdate) -> ReasoningChunk:
    return ReasoningChunk(steps=(update.step,) if update.step is not None else (), result=update.result)
