"""An agent tool: "reason about this image" by name, streaming steps into the agent's stream.

Tool arguments are written by a language model, so they never carry image data (a model cannot
copy megabytes of base64 faithfully, and it would bloat every later prompt) and never reach
arbitrary files: the ``image`` argument is a name from an :class:`ImageRegistry` or a file path
under one of its allowed folders. The result is ``content_and_artifact``: the answer text for
the model, the :class:`~dreamr_stream.ReasoningResult` (steps, verdicts, statistics) as JSON data
for the program. Each verified step is written to LangGraph's custom stream as it is verified
(``stream_mode="custom"``), and the underlying Runnable's ``on_chain_stream`` and
``dreamr_verdict`` events reach ``astream_events`` of the agent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import aclosing, closing
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.runnables import RunnableConfig, patch_config
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

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
                if real.is_file() and any(real.is_relative_to(d) for d in self.allowed_dirs):
                    return real
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

    def _step_events(self, image: str, chunk: ReasoningChunk, writer: Callable[[Any], None] | None) -> None:
        if writer is not None:
            for step in chunk.steps:
                writer(ToolStepEvent(tool=self.name, image=image, step=step))

    @staticmethod
    def _output(total: ReasoningChunk) -> tuple[str, dict[str, Any]]:
        """The answer for the model; the result as JSON data for the program.

        JSON, not the pydantic object: agents checkpoint their messages, and a checkpointer
        stores plain data safely (``ReasoningResult.model_validate(artifact)`` types it again).
        """
        result = total.result
        if result is None:
            raise BackendError("the reasoner finished without a result")
        return (result.answer if result.answer is not None else result.text), result.model_dump(mode="json")

    def _run(
        self,
        image: str,
        question: str,
        config: RunnableConfig,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        request = self._request(image, question)
        child = patch_config(config, callbacks=run_manager.get_child() if run_manager else None)
        writer = _stream_writer()
        total = ReasoningChunk()
        try:
            stream = self.runnable.stream(request, child)
            with closing(stream):
                for chunk in stream:
                    self._step_events(image, chunk, writer)
                    total = total + chunk
        except InputError as e:
            raise ToolException(f"{type(e).__name__}: {e}") from e
        return self._output(total)

    async def _arun(
        self,
        image: str,
        question: str,
        config: RunnableConfig,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        request = self._request(image, question)
        child = patch_config(config, callbacks=run_manager.get_child() if run_manager else None)
        writer = _stream_writer()
        total = ReasoningChunk()
        try:
            astream = self.runnable.astream(request, child)
            async with aclosing(astream):
                async for chunk in astream:
                    self._step_events(image, chunk, writer)
                    total = total + chunk
        except InputError as e:
            raise ToolException(f"{type(e).__name__}: {e}") from e
        return self._output(total)
