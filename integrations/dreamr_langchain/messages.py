"""Chat messages -> one (image, question) request; the reply's steps -> standard reasoning blocks.

Input side:

The reasoner answers one question about one image; it has no notion of a conversation. So:

* the question is the text of the last ``HumanMessage`` (system prompts and earlier turns are
  not part of the reasoner's prompt format and are ignored);
* the image is the one image block in the human messages, in any format that LangChain's
  ``content_blocks`` normalises (OpenAI ``image_url`` data URLs, v0 ``source_type`` blocks,
  Anthropic ``source`` blocks, v1 ``{"type": "image", "base64": ...}``, data URLs in ``url``),
  or, when the messages carry none, the chat model's default image;
* two images, remote URLs, provider file ids, audio, video, PDFs and unknown blocks are errors:
  guessing which picture a question is about, or fetching URLs, would be silent surprises.

Image data is decoded here to bytes. (The core reads a file only from a ``pathlib.Path``, never
from a string, so message content cannot name a local file to read.)

Output side: a reply carries its verified steps in ``additional_kwargs["dreamr_steps"]`` and the
answer as its text. :func:`reply_blocks` and :func:`reply_chunk_blocks` are the content
translator registered for the ``dreamr`` provider, so ``message.content_blocks`` (and
``output_version="v1"``, which stores those blocks in ``content``) shows each step as a standard
``{"type": "reasoning", "reasoning": ..., "extras": {"source", "verdict", "timing"}}`` block
before the answer's text block.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.content import ContentBlock, ReasoningContentBlock, TextContentBlock

from dreamr_langchain.types import ImageLike, UnsupportedContentError
from dreamr_stream import InvalidImageError, InvalidQuestionError

__all__ = [
    "STEPS_KEY",
    "ChatRequest",
    "parse_messages",
    "reasoning_block",
    "reply_blocks",
    "reply_chunk_blocks",
]

#: ``additional_kwargs`` key of a reply's verified steps (each a ``Step`` as JSON, plus ``step_s``).
STEPS_KEY = "dreamr_steps"


@dataclass(frozen=True)
class ChatRequest:
    image: ImageLike
    question: str


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError(f"{where}: the image data is not valid base64") from e


def _image_bytes(block: dict[str, Any], where: str) -> bytes:
    """Bytes of one standard (v1) image block."""
    if block.get("base64"):
        return _b64(str(block["base64"]), where)
    url = block.get("url")
    if isinstance(url, str) and url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise InvalidImageError(f"{where}: data URLs must be base64-encoded (data:image/png;base64,...)")
        return _b64(data, where)
    if url:
        raise UnsupportedContentError(
            f"{where}: remote image URLs are not fetched; send the image as base64 or a data URL"
        )
    if block.get("file_id"):
        raise UnsupportedContentError(f"{where}: provider file ids are not supported; send the image as base64")
    raise InvalidImageError(f"{where}: the image block has no data")


def _describe(block: dict[str, Any]) -> str:
    kind = block.get("type")
    if kind == "non_standard":
        value = block.get("value")
        inner = value.get("type") if isinstance(value, dict) else None
        return f"an unrecognised block{f' of type {inner!r}' if inner else ''}"
    return f"a {kind!r} block"


def parse_messages(messages: Sequence[BaseMessage], default_image: ImageLike | None = None) -> ChatRequest:
    """The request in ``messages``; raises an ``InputError`` subclass that says what is wrong."""
    humans = [(i, m) for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    if not humans:
        raise InvalidQuestionError("no HumanMessage with a question")
    images: list[tuple[str, bytes]] = []
    question: list[str] = []
    last = humans[-1][0]
    for i, message in humans:
        for j, block in enumerate(message.content_blocks):
            where = f"message {i} block {j}"
            kind = block.get("type")
            if kind == "image" or (kind == "file" and str(block.get("mime_type", "")).startswith("image/")):
                images.append((where, _image_bytes(dict(block), where)))
            elif kind == "text":
                if i == last:
                    question.append(str(block.get("text", "")))
            else:
                raise UnsupportedContentError(
                    f"{where}: {_describe(dict(block))} is not supported; send one image and a text question"
                )
    if len(images) > 1:
        raise InvalidImageError(
            f"the reasoner takes exactly one image per request; found {len(images)} ({'; '.join(w for w, _ in images)})"
        )
    if images:
        image: ImageLike = images[0][1]
    elif default_image is not None:
        image = default_image
    else:
        raise InvalidImageError(
            "no image in the messages: add an image content block to the HumanMessage "
            '(e.g. {"type": "image", "base64": ..., "mime_type": "image/png"}) or set the model\'s default_image'
        )
    text = "\n".join(t for t in question if t.strip()).strip()
    if not text:
        raise InvalidQuestionError(f"message {last} (the last HumanMessage) has no question text")
    return ChatRequest(image=image, question=text)


# ---------------------------------------------------------------------------------- replies
def reasoning_block(step: Mapping[str, Any], *, index: int | None = None) -> ReasoningContentBlock:
    """One verified step (a ``dreamr_steps`` entry) as a standard reasoning block."""
    timing = {"elapsed_s": step.get("elapsed_s"), "step_s": step.get("step_s")}
    extras = {"source": step.get("source"), "verdict": step.get("verdict"), "timing": timing}
    if step.get("rejected_draft") is not None:
        extras["rejected_draft"] = step["rejected_draft"]
    block = ReasoningContentBlock(type="reasoning", reasoning=str(step.get("text", "")), extras=extras)
    if index is not None:
        block["index"] = index
    return block


def _steps(message: BaseMessage) -> list[Mapping[str, Any]]:
    steps = message.additional_kwargs.get(STEPS_KEY) or []
    return [s for s in steps if isinstance(s, Mapping)]


def _text_blocks(content: str | list[Any]) -> list[ContentBlock]:
    if isinstance(content, str):
        return [TextContentBlock(type="text", text=content)] if content else []
    blocks: list[ContentBlock] = []
    for item in content:
        if isinstance(item, str):
            blocks.append(TextContentBlock(type="text", text=item))
        elif isinstance(item, dict) and item.get("type") != "reasoning":
            blocks.append(cast(ContentBlock, item))
    return blocks


def reply_blocks(message: AIMessage) -> list[ContentBlock]:
    """A whole reply: one reasoning block per verified step, then the answer's text block."""
    reasoning: list[ContentBlock] = [reasoning_block(s) for s in _steps(message)]
    return reasoning + _text_blocks(message.content)


def reply_chunk_blocks(chunk: AIMessageChunk) -> list[ContentBlock]:
    """One streamed chunk's blocks, each with an ``index`` so that summed chunks keep one block per
    step: a step's block is indexed by the step, the answer's text by the step after the last."""
    steps = _steps(chunk)
    blocks: list[ContentBlock] = [reasoning_block(s, index=int(s.get("index", 0))) for s in steps]
    after = max((int(s.get("index", 0)) for s in steps), default=-1) + 1
    for block in _text_blocks(chunk.content):
        block.setdefault("index", after)  # type: ignore[typeddict-item]
        blocks.append(block)
    return blocks
