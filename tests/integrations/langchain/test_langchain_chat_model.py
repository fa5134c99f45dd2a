"""ChatDreamr on the scripted reasoner: message formats, chunks and metadata, parameters, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dreamr_langchain import ChatDreamr, UnsupportedContentError, parse_messages
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from lc_support import DRAFT, TARGET, assert_closed, b64, make_reasoner, png_bytes, wait_idle
from pydantic import ValidationError

from dreamr_stream import InvalidImageError, InvalidQuestionError, Reasoner

PNG = png_bytes()
B64 = b64(PNG)
QUESTION = "how many?"

IMAGE_BLOCKS: dict[str, dict[str, Any]] = {
    "openai_image_url": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}},
    "v1_base64": {"type": "image", "base64": B64, "mime_type": "image/png"},
    "v1_data_url": {"type": "image", "url": f"data:image/png;base64,{B64}"},
    "v0_source_type": {"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/png"},
    "anthropic_source": {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
    "file_with_image_mime": {"type": "file", "base64": B64, "mime_type": "image/png"},
}


def ask(block: dict[str, Any] | None = None, text: str = QUESTION) -> HumanMessage:
    content: list[Any] = [{"type": "text", "text": text}]
    if block is not None:
        content.append(block)
    return HumanMessage(content=content)


@pytest.mark.parametrize("form", sorted(IMAGE_BLOCKS))
def test_every_standard_image_block_is_understood(form: str) -> None:
    request = parse_messages([ask(IMAGE_BLOCKS[form])])
    assert request.image == PNG and request.question == QUESTION


def test_question_is_the_last_human_message_and_the_image_may_come_earlier() -> None:
    messages = [
        SystemMessage("be brief"),
        ask(IMAGE_BLOCKS["v1_base64"], "first question"),
        AIMessage("first answer"),
        HumanMessage("and how many are red?"),
    ]
    request = parse_messages(messages)
    assert request.image == PNG and request.question == "and how many are red?"


def test_message_image_wins_over_the_default_image() -> None:
    assert parse_messages([ask(IMAGE_BLOCKS["v1_base64"])], default_image=b"other").image == PNG
    assert parse_messages([HumanMessage(QUESTION)], default_image=b"other").image == b"other"


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ([HumanMessage(QUESTION)], InvalidImageError, "no image in the messages"),
        ([SystemMessage("hi")], InvalidQuestionError, "no HumanMessage"),
        ([ask(IMAGE_BLOCKS["v1_base64"], "  ")], InvalidQuestionError, "no question text"),
        (
            [HumanMessage(content=[IMAGE_BLOCKS["v1_base64"], IMAGE_BLOCKS["openai_image_url"], "q"])],
            InvalidImageError,
            "exactly one image per request; found 2 \\(message 0 block 0; message 0 block 1\\)",
        ),
        (
            [ask(IMAGE_BLOCKS["v1_base64"]), AIMessage("ok"), ask(IMAGE_BLOCKS["v1_data_url"])],
            InvalidImageError,
            "found 2 \\(message 0 block 1; message 2 block 1\\)",
        ),
        ([ask({"type": "image", "url": "https://example.com/a.png"})], UnsupportedContentError, "not fetched"),
        ([ask({"type": "image", "file_id": "file-123"})], UnsupportedContentError, "file ids"),
        ([ask({"type": "image", "base64": "%%% not base64"})], InvalidImageError, "not valid base64"),
        ([ask({"type": "image", "url": "data:image/png,rawbytes"})], InvalidImageError, "base64-encoded"),
        ([ask({"type": "audio", "base64": B64, "mime_type": "audio/wav"})], UnsupportedContentError, "'audio'"),
        ([ask({"type": "file", "base64": B64, "mime_type": "application/pdf"})], UnsupportedContentError, "'file'"),
        ([ask({"type": "weird", "x": 1})], UnsupportedContentError, "unrecognised block of type 'weird'"),
    ],
)
def test_bad_messages_give_clear_errors(messages: list[Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        parse_messages(messages)
    assert isinstance(info.value, ValueError)


def test_non_image_bytes_fail_before_any_model_work(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner)
    with pytest.raises(InvalidImageError, match="not a readable image"):
        chat.invoke([ask({"type": "image", "base64": b64(b"plain text, not a picture"), "mime_type": "image/png"})])
    assert reasoner.target.calls == 0


@pytest.mark.asyncio
async def test_astream_yields_one_chunk_per_step_with_its_verdict_and_source(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner)
    chunks = [c async for c in chat.astream([ask(IMAGE_BLOCKS["openai_image_url"])])]
    assert len(chunks) == len(TARGET)
    assert [c.content for c in chunks] == [TARGET[0], *("\n" + t for t in TARGET[1:])]
    steps = [c.additional_kwargs["dreamr_steps"] for c in chunks]
    assert all(len(s) == 1 for s in steps)
    assert [s[0]["source"] for s in steps] == ["draft", "target", "draft", "draft"]
    assert steps[0][0]["verdict"]["accepted"] is True and steps[1][0]["rejected_draft"] == DRAFT[1]
    assert [c.chunk_position for c in chunks] == [None, None, None, "last"]
    assert all(c.usage_metadata is None and not c.response_metadata.get("model_name") for c in chunks[:-1])
    last = chunks[-1]
    assert last.usage_metadata is not None and last.usage_metadata["output_tokens"] > 0
    assert last.response_metadata["model_name"] == "dreamr-fpsr"
    assert last.response_metadata["finish_reason"] == "stop" and last.response_metadata["answer"] == "4"
    full = sum(chunks[1:], chunks[0])
    assert isinstance(full, AIMessageChunk)
    assert full.text == "\n".join(TARGET)
    assert [s["text"] for s in full.additional_kwargs["dreamr_steps"]] == TARGET


@pytest.mark.asyncio
async def test_invoke_ainvoke_and_stream_agree(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner)
    message = [ask(IMAGE_BLOCKS["v1_base64"])]
    async_result = await chat.ainvoke(message)
    sync_result = chat.invoke(message)  # a sync call inside this test's running loop
    streamed = await asyncio.to_thread(lambda: list(chat.stream(message)))
    for result in (async_result, sync_result):
        assert isinstance(result, AIMessage)
        assert result.content == "\n".join(TARGET)
        assert len(result.additional_kwargs["dreamr_steps"]) == len(TARGET)
        assert result.usage_metadata is not None and result.response_metadata["model_name"] == "dreamr-fpsr"
    assert "".join(str(c.content) for c in streamed) == async_result.content


def test_batch_runs_every_conversation(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner)
    results = chat.batch([[ask(IMAGE_BLOCKS["v1_base64"], f"q{i}")] for i in range(3)])
    assert [r.content for r in results] == ["\n".join(TARGET)] * 3


def test_stop_sequence_ends_the_stream_and_the_request() -> None:
    reasoner = make_reasoner(delay=0.005)
    chat = ChatDreamr(reasoner=reasoner)
    chunks = list(chat.stream([ask(IMAGE_BLOCKS["v1_base64"])], stop=["two"]))
    assert "".join(str(c.content) for c in chunks) == f"{TARGET[0]}\nread row "
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].response_metadata["finish_reason"] == "stop"
    assert chunks[-1].response_metadata["stop_sequence"] == "two"
    assert_closed(reasoner)
    wait_idle(reasoner)
    # constructor-level stop sequences work the same way
    result = ChatDreamr(reasoner=make_reasoner(), stop=["count"]).invoke([ask(IMAGE_BLOCKS["v1_base64"])])
    assert result.content == f"{TARGET[0]}\n{TARGET[1]}\n"


def test_model_name_selects_the_method(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner)
    result = chat.invoke([ask(IMAGE_BLOCKS["v1_base64"])], model="dreamr-target_only")
    assert result.response_metadata["model_name"] == "dreamr-target_only"
    assert {s["source"] for s in result.additional_kwargs["dreamr_steps"]} == {"target"}
    assert ChatDreamr(model="dreamr-draft_only", reasoner=reasoner).model_name == "dreamr-draft_only"
    with pytest.raises(ValidationError, match="unknown model"):
        ChatDreamr(model="gpt-4o")
    with pytest.raises(ValueError, match="unknown model"):
        chat.invoke([ask(IMAGE_BLOCKS["v1_base64"])], model="gpt-4o")


def test_generation_parameters_reach_the_reasoner(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner, max_steps=2, temperature=0.0, max_tokens=50)
    result = chat.invoke([ask(IMAGE_BLOCKS["v1_base64"])])
    assert result.content == f"{TARGET[0]}\n{TARGET[1]}"
    assert result.response_metadata["finish_reason"] == "length"
    shorter = chat.invoke([ask(IMAGE_BLOCKS["v1_base64"])], max_steps=1)
    assert shorter.content == TARGET[0]
    with pytest.raises(TypeError, match="unexpected keyword"):
        chat.invoke([ask(IMAGE_BLOCKS["v1_base64"])], top_k=3)


def test_default_image_serves_text_only_conversations(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner, default_image=PNG)
    assert chat.invoke("how many?").content == "\n".join(TARGET)
    with pytest.raises(InvalidImageError, match="no image"):
        ChatDreamr(reasoner=reasoner).invoke("how many?")


def test_ls_params_follow_the_standard(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner, temperature=0.0, max_tokens=64, stop=["x"])
    params = chat._get_ls_params()
    assert params == {
        "ls_provider": "dreamr",
        "ls_model_name": "dreamr-fpsr",
        "ls_model_type": "chat",
        "ls_temperature": 0.0,
        "ls_max_tokens": 64,
        "ls_stop": ["x"],
    }
    assert chat._get_ls_params(model="dreamr-sequential")["ls_model_name"] == "dreamr-sequential"


@pytest.mark.asyncio
async def test_timeout_raises_and_closes_the_request() -> None:
    reasoner = make_reasoner(delay=0.05)
    with pytest.raises(TimeoutError):
        await ChatDreamr(reasoner=reasoner, timeout=0.1).ainvoke([ask(IMAGE_BLOCKS["v1_base64"])])
    assert_closed(reasoner)
    await asyncio.to_thread(wait_idle, reasoner)


@pytest.mark.asyncio
async def test_astream_events_show_one_stream_event_per_step(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner)
    events = [e async for e in chat.astream_events([ask(IMAGE_BLOCKS["v1_base64"])], version="v2")]
    streamed = [e["data"]["chunk"] for e in events if e["event"] == "on_chat_model_stream"]
    assert [c.additional_kwargs["dreamr_steps"][0]["text"] for c in streamed] == TARGET
