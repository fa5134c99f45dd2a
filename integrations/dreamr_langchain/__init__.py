"""LangChain integration for dreamr-stream: a Runnable, a chat model and an agent tool.

* :class:`ReasonerRunnable` -- ``{image, question}`` in, one :class:`ReasoningChunk` per verified step out;
* :class:`ChatDreamr` -- a ``BaseChatModel``: an image block + a question in, one ``AIMessageChunk`` per step;
* :class:`ImageReasoningTool` -- an agent tool over named images (:class:`ImageRegistry`).

Install with ``pip install "dreamr-stream[langchain]"``. Depends only on ``dreamr_stream``'s public API.
"""

from dreamr_langchain.chat_model import MODEL_NAMES, ChatDreamr
from dreamr_langchain.messages import ChatRequest, parse_messages
from dreamr_langchain.runnable import ReasonerRunnable
from dreamr_langchain.tool import ImageQuestion, ImageReasoningTool, ImageRegistry
from dreamr_langchain.types import (
    VERDICT_EVENT,
    ImageLike,
    ImageNotAllowedError,
    ReasoningChunk,
    ReasoningInput,
    ToolStepEvent,
    UnsupportedContentError,
    VerdictEvent,
)

__all__ = [
    "MODEL_NAMES",
    "VERDICT_EVENT",
    "ChatDreamr",
    "ChatRequest",
    "ImageLike",
    "ImageNotAllowedError",
    "ImageQuestion",
    "ImageReasoningTool",
    "ImageRegistry",
    "ReasonerRunnable",
    "ReasoningChunk",
    "ReasoningInput",
    "ToolStepEvent",
    "UnsupportedContentError",
    "VerdictEvent",
    "parse_messages",
]
