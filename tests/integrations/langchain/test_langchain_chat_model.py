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
    assert [c.content for c in chunks] == ["", "", "", "4"]  # the steps are reasoning; the answer is the text
    assert [c.additional_kwargs["reasoning_content"] for c in chunks] == [TARGET[0], *("\n" + t for t in TARGET[1:])]
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
    assert full.text == "4"
    assert full.additional_kwargs["reasoning_content"] == "\n".join(TARGET)
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
        assert result.content == "4"
        assert result.additional_kwargs["reasoning_content"] == "\n".join(TARGET)
        assert len(result.additional_kwargs["dreamr_steps"]) == len(TARGET)
        assert result.usage_metadata is not None and result.response_metadata["model_name"] == "dreamr-fpsr"
    assert "".join(str(c.content) for c in streamed) == async_result.content


def test_batch_runs_every_conversation(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner)
    results = chat.batch([[ask(IMAGE_BLOCKS["v1_base64"], f"q{i}")] for i in range(3)])
    assert [r.content for r in results] == ["4"] * 3
    assert [r.additional_kwargs["reasoning_content"] for r in results] == ["\n".join(TARGET)] * 3


def test_stop_sequence_ends_the_stream_and_the_request() -> None:
    reasoner = make_reasoner(delay=0.005)
    chat = ChatDreamr(reasoner=reasoner)
    chunks = list(chat.stream([ask(IMAGE_BLOCKS["v1_base64"])], stop=["two"]))
    assert "".join(c.additional_kwargs["reasoning_content"] for c in chunks) == f"{TARGET[0]}\nread row "
    assert all(c.content == "" for c in chunks)  # stopped before any answer
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].response_metadata["finish_reason"] == "stop"
    assert chunks[-1].response_metadata["stop_sequence"] == "two"
    assert_closed(reasoner)
    wait_idle(reasoner)
    # constructor-level stop sequences work the same way
    result = ChatDreamr(reasoner=make_reasoner(), stop=["count"]).invoke([ask(IMAGE_BLOCKS["v1_base64"])])
    assert result.additional_kwargs["reasoning_content"] == f"{TARGET[0]}\n{TARGET[1]}\n"


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
    assert result.additional_kwargs["reasoning_content"] == f"{TARGET[0]}\n{TARGET[1]}"
    assert result.content == ""  # no answer within two steps
    assert result.response_metadata["finish_reason"] == "length"
    shorter = chat.invoke([ask(IMAGE_BLOCKS["v1_base64"])], max_steps=1)
    assert shorter.additional_kwargs["reasoning_content"] == TARGET[0]
    with pytest.raises(TypeError, match="unexpected keyword"):
        chat.invoke([ask(IMAGE_BLOCKS["v1_base64"])], top_k=3)


def test_default_image_serves_text_only_conversations(reasoner: Reasoner) -> None:
    chat = ChatDreamr(reasoner=reasoner, default_image=PNG)
    assert chat.invoke("how many?").content == "4"
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


def _reasoning(blocks: list[Any]) -> list[tuple[str, str]]:
    return [(b["reasoning"], b["extras"]["source"]) for b in blocks if b["type"] == "reasoning"]


def _untimed(blocks: Any) -> list[dict[str, Any]]:
    """Blocks without what differs between two runs (timing) or between streamed and whole (index)."""
    out = []
    for block in blocks:
        block = {k: v for k, v in block.items() if k != "index"}
        if "extras" in block:
            block["extras"] = {k: v for k, v in block["extras"].items() if k != "timing"}
        out.append(block)
    return out


def test_steps_are_standard_reasoning_blocks_and_the_answer_is_the_text(reasoner: Reasoner) -> None:
    result = ChatDreamr(reasoner=reasoner).invoke([ask(IMAGE_BLOCKS["v1_base64"])])
    blocks = result.content_blocks
    assert [b["type"] for b in blocks] == ["reasoning"] * len(TARGET) + ["text"]
    assert _reasoning(blocks) == list(zip(TARGET, ["draft", "target", "draft", "draft"], strict=True))
    assert blocks[-1]["text"] == "4" and result.text == "4"
    first, repaired = blocks[0]["extras"], blocks[1]["extras"]  # type: ignore[typeddict-item]
    assert first["verdict"]["accepted"] is True and repaired["rejected_draft"] == DRAFT[1]
    timing = [b["extras"]["timing"] for b in blocks[:-1]]  # type: ignore[typeddict-item]
    assert all(t["step_s"] >= 0 for t in timing)
    assert sum(t["step_s"] for t in timing) == pytest.approx(timing[-1]["elapsed_s"], abs=1e-5)


@pytest.mark.parametrize("version", ["v0", "v1"])
def test_streamed_chunks_add_up_to_the_invoked_message(reasoner: Reasoner, version: str) -> None:
    chat = ChatDreamr(reasoner=reasoner, output_version=version)
    message = [ask(IMAGE_BLOCKS["v1_base64"])]
    invoked = chat.invoke(message)
    chunks = list(chat.stream(message))
    full = sum(chunks[1:], chunks[0])
    assert full.text == invoked.text == "4"
    assert _untimed(full.content_blocks) == _untimed(invoked.content_blocks)
    assert len(_reasoning(full.content_blocks)) == len(TARGET)
    assert full.additional_kwargs["reasoning_content"] == invoked.additional_kwargs["reasoning_content"]
    if version == "v1":  # the blocks are the content itself, one per step, then the answer
        assert isinstance(invoked.content, list) and _untimed(full.content) == _untimed(invoked.content)
        assert len(invoked.content) == len(TARGET) + 1
        assert [b["type"] for b in chunks[0].content] == ["reasoning"]  # type: ignore[index]


def test_older_readers_find_the_steps_in_reasoning_content(reasoner: Reasoner) -> None:
    """A reader that knows no dreamr translator (a message rebuilt from plain fields) still sees the
    steps as reasoning, through LangChain's reading of ``additional_kwargs["reasoning_content"]``."""
    result = ChatDreamr(reasoner=reasoner).invoke([ask(IMAGE_BLOCKS["v1_base64"])])
    plain = AIMessage(content=result.content, additional_kwargs={"reasoning_content": "\n".join(TARGET)})
    assert [b["type"] for b in plain.content_blocks] == ["reasoning", "text"]
    assert plain.content_blocks[0]["reasoning"] == result.additional_kwargs["reasoning_content"]
