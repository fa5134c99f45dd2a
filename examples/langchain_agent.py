"""A LangChain agent that uses the reasoner as a tool: offline, on the shipped demo models.

python examples/langchain_agent.py

A real agent's model would be an LLM that decides to call the tool; here ``ScriptedToolCaller``
plays that part (no network, no API key): it asks the tool about the named image, then reports
the tool's answer. While the tool runs, each verified reasoning step reaches the agent's
``custom`` stream; the final answer comes after them in the ``updates`` stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from dreamr_langchain import ImageReasoningTool, ImageRegistry, ToolStepEvent
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from dreamr_stream import Reasoner

IMAGES = Path(__file__).parent / "images"
IMAGE = "puzzle-1"
QUESTION = (IMAGES / f"{IMAGE}.txt").read_text().strip()


class ScriptedToolCaller(BaseChatModel):
    """Stands in for an LLM: first a tool call about ``image``, then the tool's answer as text."""

    image: str
    question: str
    tool_name: str = "reason_about_image"

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-caller"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedToolCaller:  # type: ignore[override]
        return self  # the script already knows its one tool

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            reply = AIMessage(content=f"The reasoner's answer: {last.content}")
        else:
            call = {"name": self.tool_name, "args": {"image": self.image, "question": self.question}, "id": "call-1"}
            reply = AIMessage(content="", tool_calls=[{**call, "type": "tool_call"}])
        return ChatResult(generations=[ChatGeneration(message=reply)])


def build_agent(reasoner: Reasoner, *, image: str = IMAGE, question: str = QUESTION) -> Any:
    """The agent: the scripted model plus the reasoning tool over the example images."""
    tool = ImageReasoningTool.from_reasoner(reasoner, ImageRegistry.from_folder(IMAGES))
    model = ScriptedToolCaller(image=image, question=question, tool_name=tool.name)
    return create_agent(model, [tool], system_prompt="Use the image tool to answer questions about images.")


async def main() -> None:
    agent = build_agent(Reasoner.demo())
    request = {"messages": [HumanMessage(f"About image {IMAGE}: {QUESTION}")]}
    print("Q:", QUESTION)
    async for mode, chunk in agent.astream(request, stream_mode=["custom", "updates"]):
        if mode == "custom" and isinstance(chunk, ToolStepEvent):
            step = chunk.step
            print(f"  step {step.index} [{step.source.value:6}] {step.text}")
        elif mode == "updates":
            for update in chunk.values():
                for message in (update or {}).get("messages", []):
                    if isinstance(message, AIMessage) and not message.tool_calls:
                        print("A:", message.content)


if __name__ == "__main__":
    anyio.run(main)
