"""The agent tool: image references (never data), content_and_artifact, streaming into an agent."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

import pytest
from dreamr_langchain import ImageNotAllowedError, ImageReasoningTool, ImageRegistry, ToolStepEvent
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from lc_support import EXAMPLES, TARGET, load_agent_example, png_bytes

from dreamr_stream import InvalidImageError, Reasoner, ReasoningResult

IMAGES = EXAMPLES / "images"


@pytest.fixture
def registry(tmp_path: Path) -> ImageRegistry:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    return ImageRegistry({"red": png_bytes()}, allowed_dirs=[allowed])


def call(tool: ImageReasoningTool, **args: Any) -> dict[str, Any]:
    return {"name": tool.name, "args": args, "id": "call-1", "type": "tool_call"}


def test_registry_resolves_names_and_allowed_files_only(registry: ImageRegistry, tmp_path: Path) -> None:
    assert registry.resolve("red") == png_bytes()
    assert registry.resolve("cat.png") == (tmp_path / "allowed" / "cat.png").resolve()
    assert registry.resolve(str(tmp_path / "allowed" / "cat.png")) == (tmp_path / "allowed" / "cat.png").resolve()
    for bad in ["../secret.png", str(tmp_path / "secret.png"), "link.png", "missing.png", "", "/etc/passwd"]:
        with pytest.raises(ImageNotAllowedError):
            registry.resolve(bad)
    with pytest.raises(ImageNotAllowedError, match="not accepted as a tool argument"):
        registry.resolve("data:image/png;base64,iVBORw0KGgo=")
    with pytest.raises(ImageNotAllowedError, match="not accepted"):
        registry.resolve("A" * 5000)
    with pytest.raises(ImageNotAllowedError, match="one of 'red' or a file path under") as info:
        registry.resolve("blue")
    assert isinstance(info.value, InvalidImageError) and isinstance(info.value, ValueError)


def test_registry_from_folder_names_files_by_stem() -> None:
    registry = ImageRegistry.from_folder(IMAGES)
    assert {"puzzle-1", "puzzle-2", "puzzle-3"} <= set(registry.names)
    assert registry.resolve("puzzle-1") == IMAGES / "puzzle-1.png"


def test_tool_schema_takes_a_reference_and_a_question(reasoner: Reasoner) -> None:
    tool = ImageReasoningTool.from_reasoner(reasoner, ImageRegistry.from_folder(IMAGES))
    assert set(tool.args) == {"image", "question"}
    assert all(spec["type"] == "string" for spec in tool.args.values())
    assert "'puzzle-1'" in tool.description
    assert tool.response_format == "content_and_artifact"


def test_tool_returns_the_answer_and_the_steps(reasoner: Reasoner, registry: ImageRegistry) -> None:
    tool = ImageReasoningTool.from_reasoner(reasoner, registry)
    message = tool.invoke(call(tool, image="red", question="how many?"))
    assert isinstance(message, ToolMessage) and message.status == "success"
    assert message.content == "4"
    result = ReasoningResult.model_validate(message.artifact)  # JSON data, typed again
    assert [s.text for s in result.steps] == TARGET and result.answer == "4"


@pytest.mark.asyncio
async def test_tool_works_async_and_sync_inside_a_loop(reasoner: Reasoner, registry: ImageRegistry) -> None:
    tool = ImageReasoningTool.from_reasoner(reasoner, registry)
    async_message = await tool.ainvoke(call(tool, image="cat.png", question="how many?"))
    sync_message = tool.invoke(call(tool, image="cat.png", question="how many?"))  # blocks this loop briefly
    assert async_message.content == sync_message.content == "4"
    assert [s["text"] for s in async_message.artifact["steps"]] == TARGET


@pytest.mark.parametrize(
    ("image", "question", "match"),
    [
        ("blue", "how many?", "unknown image 'blue'"),
        ("data:image/png;base64,AAAA", "how many?", "not accepted as a tool argument"),
        ("../secret.png", "how many?", "unknown image"),
        ("/etc/passwd", "how many?", "ImageNotAllowedError: unknown image '/etc/passwd'"),
        ("red", "   ", "the question is empty"),
    ],
)
def test_bad_arguments_come_back_as_error_messages_the_model_can_read(
    reasoner: Reasoner, registry: ImageRegistry, image: str, question: str, match: str
) -> None:
    tool = ImageReasoningTool.from_reasoner(reasoner, registry)
    message = tool.invoke(call(tool, image=image, question=question))
    assert isinstance(message, ToolMessage) and message.status == "error"
    assert match in str(message.content)
    assert reasoner.target.calls == 0


def test_a_tool_call_never_reads_a_file_outside_the_allowed_folders(
    reasoner: Reasoner, registry: ImageRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's string names a server file: an invalid-image error, and no file is opened."""
    opened: list[Path] = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self) or read_bytes(self))
    tool = ImageReasoningTool.from_reasoner(reasoner, registry)
    for ref in ("/etc/passwd", str(tmp_path / "secret.png"), "../secret.png", "/etc/../etc/passwd"):
        message = tool.invoke(call(tool, image=ref, question="how many?"))
        assert message.status == "error" and "ImageNotAllowedError" in str(message.content)
    assert opened == [] and reasoner.target.calls == 0
    assert issubclass(ImageNotAllowedError, InvalidImageError)
    assert tool.invoke(call(tool, image="cat.png", question="how many?")).status == "success"
    assert opened == [(tmp_path / "allowed" / "cat.png").resolve()]  # the allowed file, read as a Path


def test_a_non_image_file_is_an_error_too(reasoner: Reasoner, tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    tool = ImageReasoningTool.from_reasoner(reasoner, ImageRegistry(allowed_dirs=[tmp_path]))
    message = tool.invoke(call(tool, image="notes.png", question="how many?"))
    assert message.status == "error" and "not a readable image" in str(message.content)


def _order(parts: list[tuple[str, Any]]) -> tuple[list[ToolStepEvent], list[int], int]:
    """Steps from the custom stream, their positions, and the position of the final answer."""
    steps = [(i, c) for i, (mode, c) in enumerate(parts) if mode == "custom" and isinstance(c, ToolStepEvent)]
    answers = [
        i
        for i, (mode, c) in enumerate(parts)
        if mode == "updates"
        for update in c.values()
        for m in (update or {}).get("messages", [])
        if isinstance(m, AIMessage) and not m.tool_calls
    ]
    assert len(answers) == 1
    return [c for _, c in steps], [i for i, _ in steps], answers[0]


@pytest.mark.asyncio
async def test_agent_streams_steps_before_the_answer_on_the_scripted_reasoner(reasoner: Reasoner) -> None:
    example = load_agent_example()
    agent = example.build_agent(reasoner)
    request = {"messages": [HumanMessage("How many?")]}
    parts = [p async for p in agent.astream(request, stream_mode=["custom", "updates"])]
    steps, positions, answer_at = _order(parts)
    assert [e.step.text for e in steps] == TARGET and max(positions) < answer_at
    assert all(e.tool == "reason_about_image" and e.image == "puzzle-1" for e in steps)
    # the sync agent API runs the tool's sync path (the reasoner on the adapter's background loop)
    sync_parts = await asyncio.to_thread(lambda: list(agent.stream(request, stream_mode=["custom", "updates"])))
    sync_steps, sync_positions, sync_answer_at = _order(sync_parts)
    assert [e.step.text for e in sync_steps] == TARGET and max(sync_positions) < sync_answer_at


def test_tool_results_survive_an_agent_checkpointer(reasoner: Reasoner) -> None:
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    example = load_agent_example()
    tool = ImageReasoningTool.from_reasoner(reasoner, ImageRegistry.from_folder(IMAGES))
    model = example.ScriptedToolCaller(image="puzzle-1", question="how many?", tool_name=tool.name)
    agent = create_agent(model, [tool], checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "t1"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Deserializing unregistered type ..." for pydantic artifacts
        agent.invoke({"messages": [HumanMessage("how many?")]}, thread)
        messages = agent.get_state(thread).values["messages"]
    tool_message = next(m for m in messages if isinstance(m, ToolMessage))
    assert [s.text for s in ReasoningResult.model_validate(tool_message.artifact).steps] == TARGET


def _tool_reasoning(parts: list[Any]) -> AIMessageChunk:
    """The chat chunks an agent's ``messages`` stream carried from its tools node, added up."""
    chunks = [m for m, meta in parts if meta["langgraph_node"] == "tools" and isinstance(m, AIMessageChunk)]
    assert chunks, "the tool's reasoning did not reach the messages stream"
    assert len({c.id for c in chunks}) == 1  # one message, streamed
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _check_reasoning(message: AIMessageChunk, tool_message: ToolMessage) -> None:
    blocks = message.content_blocks
    assert [b["type"] for b in blocks] == ["reasoning"] * len(TARGET) + ["text"]  # the steps, then the answer
    assert [b.get("reasoning") for b in blocks[:-1]] == TARGET and message.text == "4"
    steps = ReasoningResult.model_validate(tool_message.artifact).steps
    for block, step in zip(blocks, steps, strict=False):
        extras = block["extras"]  # type: ignore[typeddict-item]
        assert extras["source"] == step.source.value
        assert extras["verdict"] == (step.verdict.model_dump(mode="json") if step.verdict else None)
        assert extras["timing"]["elapsed_s"] == step.elapsed_s
    assert message.additional_kwargs["reasoning_content"] == "\n".join(TARGET)  # for older readers


@pytest.mark.asyncio
async def test_a_create_agent_run_streams_the_tools_steps_as_reasoning_blocks(reasoner: Reasoner) -> None:
    """A real create_agent run, its model a scripted fake that calls the tool, then answers: the
    messages stream (what agent UIs draw) carries the tool's steps as standard reasoning blocks,
    while the ToolMessage the model reads holds the answer."""
    agent = load_agent_example().build_agent(reasoner)
    request = {"messages": [HumanMessage("How many?")]}
    for parts in (
        [p async for p in agent.astream(request, stream_mode="messages")],
        await asyncio.to_thread(lambda: list(agent.stream(request, stream_mode="messages"))),  # the sync path
    ):
        tool_message = next(m for m, _ in parts if isinstance(m, ToolMessage))
        assert tool_message.content == "4"
        _check_reasoning(_tool_reasoning(parts), tool_message)
        final = [m for m, meta in parts if meta["langgraph_node"] == "model" and m.text.startswith("The reasoner")]
        assert final and final[-1].text == "The reasoner's answer: 4"
