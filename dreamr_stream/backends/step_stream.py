"""Reasoning steps out of ONE streamed completion: the target writing the rest of an answer alone.

A served target that writes alone could be asked for one step per request (stop at the
delimiter, then a new request re-sending the whole conversation), which costs the server a
third more than the same answer asked in one plain request. Instead the rest is one streamed
completion without a stop string, cut into steps here as its text arrives, with the same
semantics as one ``generate_step`` per step:

* a step ends at the delimiter (not part of its text);
* a step that reaches ``max_tokens`` tokens without one is cut there, as ``generate_step``'s
  cap cuts it; the stream is then closed and the next step starts a new one (the model would
  otherwise go on writing the step that the cap ended);
* the answer ends at the model's end of sequence (the last step ``eos``), or when the server
  stops for length (that step is cut as by the cap).

Tokens are counted per streamed chunk (a serving engine sends one chunk per decoded token
unless it speculates), and the usage the server reports at the end corrects the last step, so
that a request's token count is the server's.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dreamr_stream.backends.base import StepOutput

__all__ = ["StepReader", "StepSplitter"]


@dataclass
class StepSplitter:
    """Cuts a stream of text pieces into steps at ``stop`` (pure: pieces in, steps out)."""

    stop: str
    max_tokens: int  # a step's token cap
    text: str = ""  # of the step under way
    tokens: int = 0  # of the step under way
    written: list[int] = field(default_factory=list)  # tokens of each step handed out

    def feed(self, piece: str, tokens: int = 1) -> list[StepOutput]:
        """The steps that ``piece`` completes (a piece spanning a delimiter counts its tokens to
        the step the delimiter ends)."""
        self.text += piece
        self.tokens += tokens
        out: list[StepOutput] = []
        while (at := self.text.find(self.stop)) >= 0:
            out.append(self._take(self.text[:at], rest=self.text[at + len(self.stop) :]))
        return out

    @property
    def capped(self) -> bool:
        """The step under way has reached its token cap without a delimiter."""
        return self.tokens >= self.max_tokens

    def cut(self, *, eos: bool = False, total_tokens: int | None = None) -> StepOutput:
        """End the step under way here: at the cap, the end of the stream or the end of
        sequence. ``total_tokens``: the server's count for the whole stream, which corrects
        this (last) step's."""
        if total_tokens is not None:
            self.tokens = max(0, total_tokens - sum(self.written))
        return self._take(self.text, rest="", eos=eos)

    def _take(self, text: str, *, rest: str, eos: bool = False) -> StepOutput:
        tokens, self.text, self.tokens = self.tokens, rest, 0
        self.written.append(tokens)
        return StepOutput(text, done=True, eos=eos, new_tokens=tokens, forwards=tokens)


class StepReader:
    """Steps out of one streamed chat completion (its parsed events, ``chunks``), read as
    they are needed. ``ended_at_eos``: the dialect's test of a finished choice."""

    def __init__(
        self,
        chunks: AsyncGenerator[dict[str, Any], None],
        splitter: StepSplitter,
        ended_at_eos: Callable[[Mapping[str, Any]], bool],
    ) -> None:
        self.chunks, self.splitter, self.ended_at_eos = chunks, splitter, ended_at_eos
        self.finish: Mapping[str, Any] | None = None  # the choice that carried the finish reason
        self.total_tokens: int | None = None  # the server's usage, once told
        self.over = False  # the stream ended, or a step was cut at the cap (a new stream follows)

    async def next_steps(self) -> list[StepOutput]:
        """Read until at least one step is complete or the stream is over."""
        if self.over:
            return []
        splitter = self.splitter
        async for chunk in self.chunks:
            usage = chunk.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                self.total_tokens = int(usage["completion_tokens"])
            for choice in chunk.get("choices") or []:
                if choice.get("finish_reason"):
                    self.finish = choice
                piece = (choice.get("delta") or {}).get("content") or ""
                if not piece:
                    continue
                steps = splitter.feed(piece)
                if steps:
                    return steps
                if splitter.capped:
                    self.over = True
                    return [splitter.cut()]
            if self.finish is not None and self.total_tokens is not None:
                break  # the usage follows the finish: nothing else of use comes
        if self.finish is None:
            raise ValueError("the stream ended without a finish reason")
        self.over = True
        return [splitter.cut(eos=self.ended_at_eos(self.finish), total_tokens=self.total_tokens)]

    async def aclose(self) -> None:
        """Close the stream (its response: the server aborts a request whose client has gone)."""
        await self.chunks.aclose()
