"""Scripted fake backends for fast, deterministic engine tests (no torch).

A ``ScriptedBackend`` "writes" whatever ``policy(question, prefix_steps)`` returns, one word
per token, and judges a candidate with ``judge_fn(question, prefix_steps, candidate)`` (by
default: positive when the candidate equals what this backend would write itself). Tokens are
words, so rollbacks and forks have real, checkable token arithmetic. ``token_delay_s`` makes
each decoded token sleep (in the worker thread), to exercise overlap and cancellation.
``AsyncScriptedBackend`` is the same model behind the ``AsyncModelBackend`` protocol, as a
served model is: calls run concurrently, a token's delay is a cancellable ``anyio.sleep``, and
scoring reports the candidate's agreed start, so that rejected steps are repaired.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import anyio
from PIL import Image

from dreamr_stream.backends.base import Capabilities, ScoreOutput, StepOutput
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError

__all__ = ["AsyncScriptedBackend", "FakeSession", "ScriptedBackend", "script_policy"]

EOS = "<eos>"
Policy = Callable[[str, Sequence[str]], str | None]  # None = end of sequence
JudgeFn = Callable[[str, Sequence[str], str], tuple[float, float]]


def script_policy(steps: Sequence[str]) -> Policy:
    """Write ``steps`` in order, whatever came before; then end."""

    def policy(question: str, prefix: Sequence[str]) -> str | None:
        return steps[len(prefix)] if len(prefix) < len(steps) else None

    return policy


@dataclass
class FakeSession:
    question: str
    tokens: list[str] = field(default_factory=list)  # words and delimiters, after the prompt
    prompt_len: int = 1
    partial: list[str] = field(default_factory=list)
    finished: bool = False  # the answer has ended (the Session protocol's flag, written here)
    closed: bool = False

    @property
    def length(self) -> int:
        return self.prompt_len + len(self.tokens)

    def steps(self, stop: str) -> list[str]:
        """Completed steps in the session (text between delimiters)."""
        out: list[str] = []
        cur: list[str] = []
        for t in self.tokens[: len(self.tokens) - len(self.partial)]:
            if t == stop:
                out.append(" ".join(cur))
                cur = []
            else:
                cur.append(t)
        return out


class ScriptedBackend:
    def __init__(
        self,
        policy: Policy | Sequence[str],
        *,
        name: str = "fake",
        judge_fn: JudgeFn | None = None,
        token_delay_s: float = 0.0,
        fail_at_call: int | None = None,
    ) -> None:
        self.policy: Policy = policy if callable(policy) else script_policy(list(policy))
        self.identity = f"fake:{name}:{policy if not callable(policy) else id(policy)}"
        self.name = name
        self.judge = JudgeTemplate(suffix="Check:")
        self.judge_fn = judge_fn or self._self_consistent
        self.token_delay_s = token_delay_s
        self.fail_at_call = fail_at_call
        self.calls = 0
        self.active_calls = 0
        self.open_sessions = 0
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> Capabilities:
        """Blocking calls, no repair, nothing to release; not on the CPU's intra-op threads."""
        return Capabilities(identity=self.identity)

    # ------------------------------------------------------------------ bookkeeping
    def _token_delay(self) -> None:
        """What a token costs: ``token_delay_s`` asleep (a subclass may compute instead)."""
        time.sleep(self.token_delay_s)

    def _enter(self) -> None:
        with self._lock:
            self.calls += 1
            self.active_calls += 1
            if self.fail_at_call is not None and self.calls >= self.fail_at_call:
                self.active_calls -= 1
                raise BackendError(f"{self.name}: injected failure at call {self.calls}")

    def _exit(self) -> None:
        with self._lock:
            self.active_calls -= 1

    def _self_consistent(self, question: str, prefix: Sequence[str], candidate: str) -> tuple[float, float]:
        return (0.9, 0.05) if self.policy(question, prefix) == candidate else (0.05, 0.9)

    # ------------------------------------------------------------------ protocol
    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> FakeSession:
        self._enter()
        try:
            self.open_sessions += 1
            return FakeSession(question=question)
        finally:
            self._exit()

    def generate_step(
        self, session: FakeSession, *, max_tokens: int, stop: str, temperature: float = 0.0, budget: int | None = None
    ) -> StepOutput:
        self._enter()
        try:
            s = session
            if s.finished:
                return StepOutput("", done=True, eos=True)
            target = self.policy(s.question, s.steps(stop))
            if target is None:
                s.finished = True
                return StepOutput(" ".join(s.partial), done=True, eos=True, new_tokens=1)
            words = target.split(" ")[:max_tokens]
            new = 0
            while budget is None or new < budget:
                if len(s.partial) == len(words):
                    s.tokens.append(stop)
                    text = " ".join(s.partial)
                    s.partial = []
                    return StepOutput(text, done=True, new_tokens=new + 1, forwards=new + 1)
                self._token_delay()
                word = words[len(s.partial)]
                s.partial.append(word)
                s.tokens.append(word)
                new += 1
            return StepOutput(" ".join(s.partial), done=False, new_tokens=new, forwards=new)
        finally:
            self._exit()

    def score(self, session: FakeSession, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        self._enter()
        try:
            if session.partial:
                raise BackendError(f"{self.name}: cannot score while a step is half-decoded")
            self._token_delay()
            p_pos, p_neg = self.judge_fn(session.question, session.steps(stop), text) if judge else (0.0, 0.0)
            own = self.policy(session.question, session.steps(stop))
            words = text.split(" ")
            logprobs = [0.0 if own == text else -5.0] * len(words)
            session.tokens.extend([*words, stop])
            return ScoreOutput(p_pos, p_neg, logprobs, n_tokens=len(words) + 1)
        finally:
            self._exit()

    def append(self, session: FakeSession, text: str, *, stop: str) -> int:
        self._enter()
        try:
            words = [*text.split(" "), stop]
            session.tokens.extend(words)
            return len(words)
        finally:
            self._exit()

    def rollback(self, session: FakeSession, n_tokens: int) -> None:
        self._enter()
        try:
            if n_tokens < 0 or n_tokens > len(session.tokens):
                raise BackendError(f"{self.name}: cannot roll back {n_tokens} tokens past the prompt")
            if n_tokens:
                del session.tokens[-n_tokens:]
            session.partial = []
            session.finished = False
        finally:
            self._exit()

    def fork(self, session: FakeSession) -> FakeSession:
        self._enter()
        try:
            self.open_sessions += 1
            return FakeSession(
                session.question, list(session.tokens), session.prompt_len, list(session.partial), session.finished
            )
        finally:
            self._exit()

    def close(self, session: FakeSession) -> None:
        if not session.closed:
            session.closed = True
            self.open_sessions -= 1


class AsyncScriptedBackend:
    """A ``ScriptedBackend`` served as an ``AsyncModelBackend`` (like a model behind vLLM)."""

    def __init__(
        self,
        policy: Policy | Sequence[str],
        *,
        token_delay_s: float = 0.0,
        streams_rest: bool = True,
        **kwargs: object,
    ) -> None:
        self.inner = ScriptedBackend(policy, **kwargs)  # type: ignore[arg-type]
        self.streams_rest = streams_rest
        self.rest_calls = 0  # generate_rest calls made
        self.name = self.inner.name
        self.judge = self.inner.judge
        self.identity = self.inner.identity
        self.token_delay_s = token_delay_s
        self.active = 0  # calls in progress now
        self.peak_active = 0  # the most calls ever in progress at once

    @property
    def capabilities(self) -> Capabilities:
        """Concurrent calls that repair and stream the rest of an answer, like a served model's."""
        return Capabilities(identity=self.identity, concurrent=True, repair=True, streams_rest=self.streams_rest)

    def _enter(self) -> None:
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)

    async def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> FakeSession:
        return self.inner.open_session(image, question, seed=seed)

    async def generate_step(
        self, session: FakeSession, *, max_tokens: int, stop: str, temperature: float = 0.0, budget: int | None = None
    ) -> StepOutput:
        self._enter()
        try:
            new = 0
            while True:  # one token per call of the inner model, each after a cancellable delay
                await anyio.sleep(self.token_delay_s)
                out = self.inner.generate_step(session, max_tokens=max_tokens, stop=stop, budget=1)
                new += out.new_tokens
                if out.done:
                    return StepOutput(out.text, done=True, eos=out.eos, new_tokens=new, forwards=new)
        finally:
            self.active -= 1

    async def generate_rest(
        self, session: FakeSession, *, max_tokens: int, stop: str, max_steps: int, temperature: float = 0.0
    ) -> AsyncIterator[StepOutput]:
        """Steps one after another in one call (as one streamed completion), until the end of
        sequence or ``max_steps``."""
        if not self.streams_rest:
            raise BackendError(f"{self.name}: generate_rest on a backend that does not stream the rest")
        self.rest_calls += 1
        for _ in range(max_steps):
            out = await self.generate_step(session, max_tokens=max_tokens, stop=stop, temperature=temperature)
            yield out
            if out.eos:
                return

    async def score(self, session: FakeSession, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        self._enter()
        try:
            await anyio.sleep(self.token_delay_s)
            own = (self.inner.policy(session.question, session.steps(stop)) or "").split(" ")
            out = self.inner.score(session, text, stop=stop, judge=judge)
            agreed: list[str] = []
            for mine, theirs in zip(own, text.split(" "), strict=False):
                if mine != theirs:
                    break
                agreed.append(mine)
            # the agreed start ends where the model's own next word differs (a word and its space)
            kept = " ".join(agreed) + (" " if agreed and len(agreed) < len(own) else "")
            return ScoreOutput(out.p_pos, out.p_neg, out.token_logprobs, n_tokens=out.n_tokens, agreed=kept)
        finally:
            self.active -= 1

    async def begin_step(self, session: FakeSession, text: str, *, proposal: str = "") -> int:
        words = text.rstrip(" ").split(" ") if text.strip() else []
        session.partial = list(words)
        session.tokens.extend(words)
        return len(words)

    async def append(self, session: FakeSession, text: str, *, stop: str) -> int:
        return self.inner.append(session, text, stop=stop)

    async def rollback(self, session: FakeSession, n_tokens: int) -> None:
        self.inner.rollback(session, n_tokens)

    async def fork(self, session: FakeSession) -> FakeSession:
        return self.inner.fork(session)

    def close(self, session: FakeSession) -> None:
        self.inner.close(session)
