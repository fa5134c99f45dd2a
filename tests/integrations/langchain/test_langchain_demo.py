"""End to end on the shipped demo models: the adapters give what the core gives; an agent streams steps.

Nothing here depends on what the demo models answer, only on behaviour: the LangChain outputs
equal ``Reasoner.ainvoke`` on the same input, and an agent sees every step before its answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dreamr_langchain import ChatDreamr, ReasonerRunnable, ToolStepEvent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from lc_support import NO_CACHE, PUZZLE, b64, load_agent_example

from dreamr_stream import Reasoner, ReasoningResult

pytestmark = pytest.mark.slow
QUESTION = PUZZLE.with_suffix(".txt").read_text().strip()


def comparable(steps: Any) -> list[tuple[Any, ...]]:
    """What must match between two greedy runs (timings and float noise aside)."""
    return [
        (s.index, s.text, s.source, s.is_final, s.rejected_draft, s.verdict.accepted if s.verdict else None)
        for s in steps
    ]


@pytest.mark.asyncio
async def test_runnable_output_equals_reasoner_ainvoke(demo_reasoner: Reasoner) -> None:
    expected = await demo_reasoner.ainvoke(PUZZLE, QUESTION, config=NO_CACHE)
    runnable = ReasonerRunnable(demo_reasoner, reasoner_config=NO_CACHE)
    streamed = [c async for c in runnable.astream({"image": PUZZLE.read_bytes(), "question": QUESTION})]
    assert [len(c.steps) for c in streamed] == [1] * len(expected.steps)
    got = await runnable.ainvoke({"image": b64(PUZZLE.read_bytes()), "question": QUESTION})
    got_sync = await asyncio.to_thread(runnable.invoke, {"image": PUZZLE, "question": QUESTION})
    for total in (sum(streamed[1:], streamed[0]), got, got_sync):
        assert comparable(total.steps) == comparable(expected.steps)
        assert total.answer == expected.answer


@pytest.mark.asyncio
async def test_chat_model_output_equals_reasoner_ainvoke(demo_reasoner: Reasoner) -> None:
    expected = await demo_reasoner.ainvoke(PUZZLE, QUESTION, config=NO_CACHE)
    chat = ChatDreamr(reasoner=demo_reasoner, reasoner_config=NO_CACHE)
    message = HumanMessage(
        content=[
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(PUZZLE.read_bytes())}"}},
        ]
    )
    chunks = [c async for c in chat.astream([message])]
    assert len(chunks) == len(expected.steps)
    result = await chat.ainvoke([message])
    assert result.text == expected.answer
    assert result.additional_kwargs["reasoning_content"] == "\n".join(s.text for s in expected.steps)
    reasoning = [b for b in result.content_blocks if b["type"] == "reasoning"]
    assert [b.get("reasoning") for b in reasoning] == [s.text for s in expected.steps]
    assert comparable(expected.steps) == [
        (s["index"], s["text"], s["source"], s["is_final"], s["rejected_draft"], (s["verdict"] or {}).get("accepted"))
        for s in result.additional_kwargs["dreamr_steps"]
    ]
    assert result.response_metadata["answer"] == expected.answer


def _timeline(parts: list[tuple[str, Any]]) -> tuple[list[ToolStepEvent], ToolMessage, AIMessage, list[str]]:
    """Steps, the tool's message and the final answer, and the order in which they arrived."""
    steps: list[ToolStepEvent] = []
    tool_messages: list[ToolMessage] = []
    answers: list[AIMessage] = []
    order: list[str] = []
    for mode, chunk in parts:
        if mode == "custom" and isinstance(chunk, ToolStepEvent):
            steps.append(chunk)
            order.append("step")
            continue
        for update in chunk.values() if mode == "updates" else []:
            for m in (update or {}).get("messages", []):
                if isinstance(m, ToolMessage):
                    tool_messages.append(m)
                    order.append("tool")
                elif isinstance(m, AIMessage) and not m.tool_calls:
                    answers.append(m)
                    order.append("answer")
    assert len(tool_messages) == 1 and len(answers) == 1
    return steps, tool_messages[0], answers[0], order


@pytest.mark.asyncio
async def test_agent_streams_every_step_before_its_answer(demo_reasoner: Reasoner) -> None:
    example = load_agent_example()
    agent = example.build_agent(demo_reasoner)
    request = {"messages": [HumanMessage(f"About image {example.IMAGE}: {example.QUESTION}")]}
    runs = {
        "async": [p async for p in agent.astream(request, stream_mode=["custom", "updates"])],
        "sync": await asyncio.to_thread(lambda: list(agent.stream(request, stream_mode=["custom", "updates"]))),
    }
    for parts in runs.values():
        steps, tool_message, answer, order = _timeline(parts)
        assert steps, "no step reached the agent's custom stream"
        assert order == ["step"] * len(steps) + ["tool", "answer"]  # all steps first, then the answer
        artifact = ReasoningResult.model_validate(tool_message.artifact)
        assert [e.step.text for e in steps] == [s.text for s in artifact.steps]
        assert [e.step.index for e in steps] == list(range(len(steps)))
        assert tool_message.content == (artifact.answer if artifact.answer is not None else artifact.text)
        assert str(tool_message.content) in str(answer.content)
