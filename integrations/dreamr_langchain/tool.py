"""An agent tool: "reason about this image" by name, streaming steps into the agent's stream.

Tool arguments are written by a language model, so they never carry image data (a model cannot
copy megabytes of base64 faithfully, and it would bloat every later prompt) and never reach
arbitrary files: the ``image`` argument is a name from an :class:`ImageRegistry` or a file path
under one of its allowed folders. The result is ``content_and_artifact``: the answer text for
the model, the :class:`~dreamr_stream.ReasoningResult` (steps, verdicts, statistics) as JSON data
for the program. Each verified step is written to LangGraph's custom stream as it is verified
(``stream_mode="custom"``), and the underlying Runnable's ``on_chain_stream`` and
``dreamr_verdict`` events reach ``astream_events`` of the agent.

The steps also stream as reasoning where LangChain renders it: the tool reports its reasoning as
a chat model run under its own run, whose chunks are ``ChatDreamr``'s (each verified step a
standard ``{"type": "reasoning", ...}`` block in ``content_blocks``, source, verdict and timing in
its ``extras``, ``additional_kwargs["reasoning_content"]`` for older readers; the answer as the
text). So an agent's ``stream_mode="messages"`` (what agent UIs draw) shows them as reasoning, and
a tracer shows the run. The ``ToolMessage`` itself keeps the answer text: LangChain's tools and
LangGraph's ``ToolNode`` (``create_agent``) accept only text-like blocks in a tool result (text,
image, json, ...) and turn any other content, reasoning blocks included, into a JSON string, which
the agent's model would then read instead of the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import aclosing, closing
from pathlib import Path
from typing import Any, Literal, NoReturn

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForToolRun,
    CallbackManager,
    CallbackManagerForLLMRun,
    CallbackManagerForToolRun,
)
from langchain_core.messages import AIMessageChunk, HumanMessage, message_chunk_to_message
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, LLMResult
from langchain_core.runnables import RunnableConfig, patch_config
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

from dreamr_langchain._updates import StepUpdate
from dreamr_langchain.chat_model import StepChunker
from dreamr_langchain.runnable import ReasonerRunnable
from dreamr_langchain.types import ImageLike, ImageNotAllowedError, ReasoningChunk, ReasoningInput, ToolStepEvent
from dreamr_stream import BackendError, InputError, Method, Reasoner

__all__ = ["ImageQuestion", "ImageReasoningTool", "ImageRegistry"]

_MAX_REF_CHARS = 1024


class ImageRegistry:
    """The images an agent may refer to: registered names, and files under allowed folders."""

    def __init__(self, images: Mapping[str, ImageLike] | None = None, *, allowed_dirs: Iterable[str | Path] = ()):
        self._images: dict[str, ImageLike] = dict(images or {})
        self.allowed_dirs = tuple(Path(d).expanduser().resolve() for d in allowed_dirs)

    @classmethod
    def from_folder(cls, folder: str | Path, pattern: str = "*.png") -> ImageRegistry:
        """Every file matching ``pattern`` in ``folder``, named by its stem (``puzzle-1.png`` -> ``puzzle-1``)."""
        return cls({p.stem: p for p in sorted(Path(folder).glob(pattern)) if p.is_file()})

    def register(self, name: str, image: ImageLike) -> None:
        self._images[name] = image

    @property
    def names(self) -> list[str]:
        return sorted(self._images)

    def describe(self) -> str:
        """How to refer to an image, for the tool description the model reads."""
        parts = [f"one of {', '.join(repr(n) for n in self.names)}"] if self._images else []
        if self.allowed_dirs:
            parts.append(f"a file path under {', '.join(str(d) for d in self.allowed_dirs)}")
        return " or ".join(parts) if parts else "(no images are available)"

    def resolve(self, ref: str) -> ImageLike:
        """The image behind ``ref``; ``ImageNotAllowedError`` for anything not allowed."""
        ref = ref.strip()
        if not ref:
            raise ImageNotAllowedError("the image reference is empty")
        if ref in self._images:
            return self._images[ref]
        if ref.startswith("data:") or len(ref) > _MAX_REF_CHARS:
            raise ImageNotAllowedError(f"image data is not accepted as a tool argument; pass {self.describe()}")
        if self.allowed_dirs:
            path = Path(ref).expanduser()
            candidates = [path] if path.is_absolute() else [d / path for d in self.allowed_dirs]
            for candidate in candidates:
                real = candidate.resolve()  # follows symlinks and '..' before the containment check
                if any(real.is_relative_to(d) for d in self.allowed_dirs) and real.is_file():
                    return real  # a Path: the core reads it as a file (a str would be image data)
        raise ImageNotAllowedError(f"unknown image {ref!r}; pass {self.describe()}")


class ImageQuestion(BaseModel):
    """Arguments of the tool, as the model sees them."""

    image: str = Field(description="which image: a registered image name or an allowed file path (never image data)")
    question: str = Field(description="the question to answer about the image")


def _stream_writer() -> Callable[[Any], None] | None:
    """LangGraph's custom-stream writer when running inside a graph node, else None."""
    try:
        from langgraph.config import get_stream_writer
    except ImportError:  # langgraph is optional: plain LangChain has no custom stream
        return None
    try:
        return get_stream_writer()
    except (RuntimeError, KeyError):  # not inside a graph run
        return None


class _ReasoningRun:
    """The tool's reasoning as a chat model run: ``ChatDreamr``'s chunks, one per verified step,
    then the whole message at the end (see the module's docstring)."""

    def __init__(self, model_name: str) -> None:
        self._chunker = StepChunker(model_name=model_name, stops=())
        self._message: AIMessageChunk | None = None
        self._id = ""

    @staticmethod
    def start_args(tool: str, image: str, question: str) -> tuple[dict[str, Any], list[list[Any]], dict[str, Any]]:
        """What the run starts with: the question asked (the image by its reference, no data)."""
        serialized = {"name": f"{tool} reasoning", "id": ["dreamr_langchain", "ImageReasoningTool"]}
        prompt = [HumanMessage(f"[image {image}] {question}")]
        return serialized, [prompt], {"name": f"{tool} reasoning"}

    def started(self, run_id: Any) -> None:
        self._id = f"lc_run--{run_id}"  # one message id for every chunk, as chat models stream

    def chunks(self, chunk: ReasoningChunk) -> list[ChatGenerationChunk]:
        """The chat chunks of one reasoning chunk, added to the run's whole message."""
        updates = [StepUpdate(step) for step in chunk.steps]
        if chunk.result is not None:
            updates = [*updates[:-1], StepUpdate(updates[-1].step if updates else None, chunk.result)]
        out = [self._chunker.chunk(u) for u in updates]
        for generation in out:
            generation.message.id = self._id
            message = generation.message
            assert isinstance(message, AIMessageChunk)
            self._message = message if self._message is None else self._message + message
        return out

    def result(self) -> LLMResult:
        message = self._message if self._message is not None else AIMessageChunk(content="", id=self._id)
        return LLMResult(generations=[[ChatGeneration(message=message_chunk_to_message(message))]])


def _llm_run(manager: CallbackManager | None, reasoning: _ReasoningRun, *start: Any) -> CallbackManagerForLLMRun | None:
    if manager is None:
        return None
    serialized, messages, kwargs = _ReasoningRun.start_args(*start)
    run = manager.on_chat_model_start(serialized, messages, **kwargs)[0]
    reasoning.started(run.run_id)
    return run


async def _allm_run(
    manager: AsyncCallbackManager | None, reasoning: _ReasoningRun, *start: Any
) -> AsyncCallbackManagerForLLMRun | None:
    if manager is None:
        return None
    serialized, messages, kwargs = _ReasoningRun.start_args(*start)
    run = (await manager.on_chat_model_start(serialized, messages, **kwargs))[0]
    reasoning.started(run.run_id)
    return run


class ImageReasoningTool(BaseTool):
    """Answer a question about an image with the reasoner; see :meth:`from_reasoner`.

    Input errors (an unknown image, an empty question, a file that is not an image) become
    ``ToolException`` messages the agent's model can read and correct (``handle_tool_error``).
    """

    name: str = "reason_about_image"
    description: str = "Answer a question about an image by verified step-by-step visual reasoning."
    args_schema: type[BaseModel] = ImageQuestion
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True

    runnable: ReasonerRunnable
    images: ImageRegistry

    @classmethod
    def from_reasoner(
        cls,
        reasoner: Reasoner,
        images: ImageRegistry,
        *,
        method: Method = "fpsr",
        name: str = "reason_about_image",
        description: str | None = None,
    ) -> ImageReasoningTool:
        """A tool over ``reasoner``; its description lists the images the model may name."""
        text = description or (
            "Answer a question about an image by verified step-by-step visual reasoning "
            f"(counting, reading, comparing). The image argument is {images.describe()}."
        )
        return cls(runnable=ReasonerRunnable(reasoner, method=method), images=images, name=name, description=text)

    def _request(self, image: str, question: str) -> ReasoningInput:
        try:
            return {"image": self.images.resolve(image), "question": question}
        except InputError as e:
            raise ToolException(f"{type(e).__name__}: {e}") from e

    @property
    def _model_name(self) -> str:
        return f"dreamr-{self.runnable.method}"

    def _run(
        self,
        image: str,
        question: str,
        config: RunnableConfig,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        call = _ToolCall(self, image, question, config, run_manager)
        llm = _llm_run(call.callbacks, call.reasoning, *call.start)
        try:
            stream = self.runnable.stream(call.request, call.config)
            with closing(stream):
                for chunk in stream:
                    for generation in call.take(chunk):
                        if llm is not None:
                            llm.on_llm_new_token(generation.text, chunk=generation)
        except BaseException as e:
            if llm is not None:
                llm.on_llm_error(e)
            _reraise(e)
        if llm is not None:
            llm.on_llm_end(call.reasoning.result())
        return call.output()

    async def _arun(
        self,
        image: str,
        question: str,
        config: RunnableConfig,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        call = _ToolCall(self, image, question, config, run_manager)
        llm = await _allm_run(call.callbacks, call.reasoning, *call.start)
        try:
            astream = self.runnable.astream(call.request, call.config)
            async with aclosing(astream):
                async for chunk in astream:
                    for generation in call.take(chunk):
                        if llm is not None:
                            await llm.on_llm_new_token(generation.text, chunk=generation)
        except BaseException as e:
            if llm is not None:
                await llm.on_llm_error(e)
            _reraise(e)
        if llm is not None:
            await llm.on_llm_end(call.reasoning.result())
        return call.output()


class _ToolCall:
    """One call of the tool: the request, its reasoning run, the custom-stream writer and the
    result so far. ``_run`` and ``_arun`` share it and differ only in how they wait."""

    def __init__(
        self,
        tool: ImageReasoningTool,
        image: str,
        question: str,
        config: RunnableConfig,
        run_manager: CallbackManagerForToolRun | AsyncCallbackManagerForToolRun | None,
    ) -> None:
        self.request = tool._request(image, question)
        self.callbacks: Any = run_manager.get_child() if run_manager else None
        self.config = patch_config(config, callbacks=self.callbacks)
        self.writer = _stream_writer()
        self.reasoning = _ReasoningRun(tool._model_name)
        self.start = (tool.name, image, question)
        self.total = ReasoningChunk()

    def take(self, chunk: ReasoningChunk) -> list[ChatGenerationChunk]:
        """Write the chunk's steps to the custom stream, add it up; its chat chunks."""
        if self.writer is not None:
            tool, image, _ = self.start
            for step in chunk.steps:
                self.writer(ToolStepEvent(tool=tool, image=image, step=step))
        self.total = self.total + chunk
        return self.reasoning.chunks(chunk)

    def output(self) -> tuple[str, dict[str, Any]]:
        """The answer for the model; the result as JSON data for the program.

        JSON, not the pydantic object: agents checkpoint their messages, and a checkpointer
        stores plain data safely (``ReasoningResult.model_validate(artifact)`` types it again).
        """
        result = self.total.result
        if result is None:
            raise BackendError("the reasoner finished without a result")
        return (result.answer if result.answer is not None else result.text), result.model_dump(mode="json")


def _reraise(e: BaseException) -> NoReturn:
    """An input error as a ``ToolException`` the agent's model can read and correct; anything else as it is."""
    if isinstance(e, InputError):
        raise ToolException(f"{type(e).__name__}: {e}") from e
    raise e
