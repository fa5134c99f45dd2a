"""A model served over an OpenAI-compatible chat API: what every such server shares.

Sessions live on our side: the image (as a ``data:`` URL), the question and the assistant text
written so far. Every call re-sends the whole conversation and relies on the server's prefix
cache to skip what it already computed, so fork, append and rollback are string operations and
a session's ``length`` counts characters.

* ``generate_step``: one streamed chat completion (server-sent events) that continues the
  assistant message and stops at the step delimiter, EOS or ``max_tokens``. Cancelling it
  closes the stream, and the server aborts a request whose client has gone.
* ``generate_rest``: the rest of the answer in one streamed completion, cut into steps as its
  text arrives (``backends.step_stream``): a target writing alone costs one plain request.
* ``score`` in judge mode: the candidate, delimiter and judge suffix appended to the assistant
  message, one output token with ``top_logprobs``; the verdict probabilities are read from them
  (the API's standard log-probs, so every such server gives them).
* ``score`` in likelihood mode needs the log-probs of the candidate's own tokens, which the
  OpenAI API cannot ask for: a dialect that can (vLLM's ``prompt_logprobs``) provides them.
* connections: one pooled ``httpx`` client per event loop (a pooled connection belongs to the
  loop that opened it), closed by ``aclose``.
* deadlines: every call has a total one, streaming included (``step_deadline_s``,
  ``score_deadline_s``), since a server that trickles bytes never trips the per-read
  ``timeout_s``; a caller's tighter limit (``backends.call_context``: the engine gives a draft's
  calls a few seconds) ends the call the same way; and a ``CircuitBreaker`` fails calls at once
  while the server is down, so a request does not pay the wait for each failure again
  (``backends.breaker``).

It is abstract: a server's dialect says how a request continues the last assistant message (not
in the OpenAI API) and how a stream tells the model's end of sequence from the delimiter;
``backends.vllm`` is vLLM's, and another server's (SGLang) is a subclass of the same size. Needs
the ``vllm`` extra (``httpx``): importing this module without it is a ``ConfigError`` saying so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Self

import anyio
from PIL import Image

from dreamr_stream.backends.base import Capabilities, EvidenceKind, ScoreOutput, StepOutput
from dreamr_stream.backends.breaker import CircuitBreaker
from dreamr_stream.backends.call_context import limit_s
from dreamr_stream.backends.settings import read_settings
from dreamr_stream.backends.step_stream import StepReader, StepSplitter
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError, ConfigError, ModelLoadError
from dreamr_stream.store import image_png

try:
    import httpx
except ImportError as e:  # pragma: no cover - the extra is installed wherever tests run
    raise ConfigError("a served model needs the vllm extra (httpx): pip install 'dreamr-stream[vllm]'") from e

__all__ = ["TOP_LOGPROBS", "ChatSession", "OpenAICompatBackend", "ServedModelError"]

TOP_LOGPROBS = 20  # OpenAI's maximum and vLLM's default --max-logprobs: verdicts outside count as 0


class ServedModelError(BackendError):
    """The server could not be reached, failed, or answered something we cannot read.

    ``unavailable``: the server is down or overloaded (no connection, no answer within the
    deadline, a 5xx), which counts towards opening the circuit breaker."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


@dataclass
class ChatSession:
    """One request's conversation with the server; ``text`` is the assistant message so far."""

    image_url: str
    question: str
    seed: int = 0
    text: str = ""
    partial: str = ""  # the start of the next step, set by begin_step (not in ``length``)
    finished: bool = False  # the answer has ended (the Session protocol's flag, written here)

    @property
    def length(self) -> int:
        return len(self.text)


def _close_step(s: ChatSession, text: str, *, eos: bool, stop: str) -> None:
    """A finished step enters the session: at the model's end of sequence the answer ends;
    otherwise (the delimiter, or the step cap, which ends the step with a delimiter as in
    process) the delimiter follows it."""
    s.partial = ""
    s.text += text if eos else text + stop
    s.finished = eos


class OpenAICompatBackend(ABC):
    """An ``AsyncModelBackend`` over a server's ``/v1/chat/completions``.

    ``url`` is the API base (``http://host:8000/v1``); ``model`` the served model name (default:
    the only one the server lists). ``judge``, ``recommended_verification``,
    ``recommended_schedule`` and ``task`` play the role of a local model folder's ``dreamr.json``
    (``connect(settings_from=...)`` reads them from one). ``timeout_s`` bounds each read;
    ``step_deadline_s`` a whole streamed step and ``score_deadline_s`` any other call (a score,
    the model list); ``breaker`` (default: 3 failures in a row open it for 5 s, doubling to 60 s
    while probes fail) is this backend's.
    ``transport`` replaces the pooled HTTP transport (``httpx.MockTransport`` in tests).
    """

    kind: ClassVar[str] = "openai"  # the dialect's name, the first part of ``identity``
    error: ClassVar[type[ServedModelError]] = ServedModelError  # what its failures raise
    evidence: ClassVar[frozenset[EvidenceKind]] = frozenset({"judge"})

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        name: str = "model",
        judge: JudgeTemplate | None = None,
        recommended_verification: Mapping[str, Any] | None = None,
        recommended_schedule: Sequence[Mapping[str, Any]] = (),
        task: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        step_deadline_s: float = 60.0,
        score_deadline_s: float = 30.0,
        breaker: CircuitBreaker | None = None,
        max_connections: int = 256,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ModelLoadError(f"not a server URL: {url!r} (expected http://host:port/v1)")
        self.url = url.rstrip("/")
        self.model = model
        self.name = name
        self.judge = judge or JudgeTemplate()
        self.recommended_verification = dict(recommended_verification or {})
        self.recommended_schedule = tuple(dict(row) for row in recommended_schedule)
        self.task = task
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.step_deadline_s = step_deadline_s
        self.score_deadline_s = score_deadline_s
        self.breaker = breaker or CircuitBreaker(name=f"{name} at {self.url}")
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        # one client per event loop: a pooled connection belongs to the loop that opened it
        self._clients: dict[int, httpx.AsyncClient] = {}

    @classmethod
    def connect(cls, url: str, *, settings_from: str | Path | None = None, name: str = "model", **kwargs: Any) -> Self:
        """A backend whose judge template, recommended verification and task come from a local
        model folder's ``dreamr.json`` (e.g. the folder the server was started on)."""
        if settings_from is not None:
            settings = read_settings(settings_from)
            kwargs.setdefault("judge", settings.judge)
            kwargs.setdefault("recommended_verification", settings.verification)
            kwargs.setdefault("recommended_schedule", settings.schedule)
            kwargs.setdefault("task", settings.task)
        return cls(url, name=name, **kwargs)

    # ------------------------------------------------------------------ what it declares
    @property
    def capabilities(self) -> Capabilities:
        """Concurrent calls to a server that repairs steps; its connections closed by ``aclose``."""
        return Capabilities(
            identity=self.identity,
            device="remote",
            concurrent=True,
            repair=True,
            evidence=self.evidence,
            cpu_threads=self.cpu_threads,
            recommended_verification=self.recommended_verification,
            recommended_schedule=self.recommended_schedule,
            task=self.task,
            release="async",
            streams_rest=True,
        )

    @property
    def cpu_threads(self) -> int:
        """A server on loopback computes on this machine's cores: counting them makes a draft on
        the same CPU take only its share (``engine.threads``); 0 for a server elsewhere."""
        host = httpx.URL(self.url).host
        return len(os.sched_getaffinity(0)) if host in ("127.0.0.1", "localhost", "::1") else 0

    @property
    def identity(self) -> str:
        """Cache-key identity: the same server and model give the same trajectories."""
        return f"{self.kind}:{self.url}:{self.model or '?'}"

    # ------------------------------------------------------------------ the dialect
    @abstractmethod
    def continuation(self, continuing: bool) -> dict[str, Any]:
        """Request settings that make the chat template continue the last assistant message
        (``continuing``) or open the assistant's answer (not in the OpenAI API)."""

    @abstractmethod
    def ended_at_eos(self, choice: Mapping[str, Any]) -> bool:
        """Whether a streamed choice that finished ended with the model's end of sequence (the
        OpenAI API says ``stop`` for that and for a stop string alike)."""

    def generation_settings(self) -> dict[str, Any]:
        """The dialect's extra settings of a step's completion request (none here)."""
        return {}

    async def likelihood(self, session: ChatSession, text: str, stop: str) -> tuple[list[float], str | None]:
        """The candidate's token log-probs and the start of it the model agrees with, after the
        session's text. The OpenAI API cannot ask for them: a dialect that can overrides this
        (and adds ``likelihood`` to ``evidence``)."""
        raise ConfigError(
            f"{self.name}: likelihood verification needs the log-probs of a prompt's tokens, which "
            f"{type(self).__name__} cannot ask {self.url} for: use judge mode"
        )

    # ------------------------------------------------------------------ HTTP
    def _client(self) -> httpx.AsyncClient:
        try:
            key = id(asyncio.get_running_loop())
        except RuntimeError:  # another event loop library (trio): one client for it
            key = 0
        client = self._clients.get(key)
        if client is None:
            # retries=2 repeats only a failed connect, which is safe for any request
            transport = self._transport or httpx.AsyncHTTPTransport(retries=2, limits=self._limits)
            client = httpx.AsyncClient(transport=transport, timeout=self._timeout, headers=self._headers)
            self._clients[key] = client
        return client

    async def aclose(self) -> None:
        """Close the connection pools (of every loop this backend was used from)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    def _fail(self, what: str, e: BaseException | str, *, unavailable: bool = False) -> ServedModelError:
        """The error for a failed exchange with the server (named by its URL); a transport
        error or a 5xx means the server is ``unavailable``."""
        detail = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else e
        if isinstance(e, httpx.HTTPStatusError):
            unavailable = e.response.status_code >= 500
        unavailable = unavailable or isinstance(e, httpx.TransportError)
        return self.error(f"{self.name}: {what} at {self.url} failed: {detail}", unavailable=unavailable)

    def _guarded(self, what: str, deadline_s: float) -> AbstractAsyncContextManager[None]:
        """One call to the server, with its deadline (the caller's limit when tighter: a draft's,
        ``backends.call_context``) and through the breaker, which counts a call past it."""
        limit = limit_s(deadline_s)
        return self.breaker.guard(
            limit,
            refused=lambda why: self.error(f"{self.name}: the server at {self.url} is {why}", unavailable=True),
            timed_out=lambda: self._fail(what, f"no complete answer within {limit:g} s", unavailable=True),
            failed=lambda e: isinstance(e, ServedModelError) and e.unavailable,
        )

    async def resolve_model(self) -> str:
        """The served model name (asks ``/models`` once when none was given)."""
        if self.model is None:
            data = await self._get_json("/models")
            try:
                names = [m["id"] for m in data["data"]]
            except (KeyError, TypeError) as e:
                raise self._fail("GET /models", f"unexpected answer {str(data)[:200]!r}") from e
            if len(names) != 1:
                raise self.error(f"{self.name}: {self.url} serves {names}; pass model= to choose one")
            self.model = names[0]
        return self.model

    async def _get_json(self, path: str) -> Any:
        async with self._guarded(f"GET {path}", self.score_deadline_s):
            try:
                r = await self._client().get(self.url + path)
                r.raise_for_status()
                return r.json()
            except (httpx.HTTPError, ValueError) as e:
                raise self._fail(f"GET {path}", e) from e

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion's answer (checked to hold choices)."""
        async with self._guarded("POST /chat/completions", self.score_deadline_s):
            try:
                r = await self._client().post(self.url + "/chat/completions", json=body)
            except httpx.HTTPError as e:
                raise self._fail("POST /chat/completions", e) from e
            if r.status_code != 200:
                detail = f"HTTP {r.status_code}: {r.text[:300]}"
                raise self._fail("POST /chat/completions", detail, unavailable=r.status_code >= 500)
        try:
            data = r.json()
        except ValueError as e:
            raise self._fail("POST /chat/completions", f"not JSON: {r.text[:200]!r}") from e
        if not isinstance(data, dict) or not data.get("choices"):
            raise self._fail("POST /chat/completions", f"no choices in {r.text[:200]!r}")
        return data

    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Server-sent events of a streamed completion, as parsed JSON chunks.

        The SSE framing is ``data: <json>`` lines ending with ``data: [DONE]``; parsing that
        takes a few lines, so no SSE library is pulled in for it. Leaving the iterator early
        (cancellation) closes the response, which aborts the server's request.
        """
        try:
            async with self._client().stream("POST", self.url + "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    detail = f"HTTP {r.status_code}: {text[:300]}"
                    raise self._fail("POST /chat/completions", detail, unavailable=r.status_code >= 500)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    try:
                        yield json.loads(payload)
                    except ValueError as e:
                        raise self._fail("streamed completion", f"not JSON: {payload[:200]!r}") from e
        except httpx.HTTPError as e:
            raise self._fail("POST /chat/completions (stream)", e) from e

    async def _body(self, session: ChatSession, assistant: str, **params: Any) -> dict[str, Any]:
        """A chat-completions request: the image and question, then ``assistant`` continued."""
        user = {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": session.image_url}},
                {"type": "text", "text": session.question},
            ],
        }
        messages: list[dict[str, Any]] = [user]
        if assistant:  # continue the assistant's message exactly where it stops
            messages.append({"role": "assistant", "content": assistant})
        params |= self.continuation(bool(assistant))
        return {"model": await self.resolve_model(), "messages": messages, **params}

    # ------------------------------------------------------------------ sessions
    async def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> ChatSession:
        png = await anyio.to_thread.run_sync(image_png, image)
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        await self.resolve_model()
        return ChatSession(image_url=url, question=question, seed=seed)

    async def generate_step(
        self,
        session: ChatSession,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
    ) -> StepOutput:
        s = session
        if s.finished:
            return StepOutput("", done=True, eos=True)
        begun = s.partial
        body = await self._body(
            s,
            s.text + begun,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=s.seed + len(s.text),  # sampled runs repeat for a fixed seed
            stop=[stop],
            stream=True,
            stream_options={"include_usage": True},
            **self.generation_settings(),
        )
        parts: list[str] = []
        finished: Mapping[str, Any] | None = None  # the choice that carried the finish reason
        tokens = 0
        async with self._guarded("streamed step", self.step_deadline_s):
            async for chunk in self._stream(body):
                usage = chunk.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens") or tokens)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    parts.append(delta.get("content") or "")
                    if choice.get("finish_reason"):
                        finished = choice
        if finished is None:
            raise self._fail("streamed completion", "the stream ended without a finish reason")
        text = begun + "".join(parts)
        eos = self.ended_at_eos(finished)
        _close_step(s, text, eos=eos, stop=stop)
        return StepOutput(text, done=True, eos=eos, new_tokens=tokens, forwards=tokens)

    async def generate_rest(
        self,
        session: ChatSession,
        *,
        max_tokens: int,
        stop: str,
        max_steps: int,
        temperature: float = 0.0,
    ) -> AsyncIterator[StepOutput]:
        """Up to ``max_steps`` steps, each as ``generate_step`` would write it, from ONE streamed
        completion without a stop string (``backends.step_stream``): a target writing the rest
        of an answer alone costs the server one plain request, not one request per step. A step
        cut at its ``max_tokens`` cap closes the stream and the next one starts a new stream.
        Each step is in the session when it is yielded; leaving early closes the stream (the
        server aborts it). The deadline ``step_deadline_s`` bounds the wait for each step."""
        s = session
        written = 0
        while written < max_steps and not s.finished:
            body = await self._body(
                s,
                s.text + s.partial,
                temperature=temperature,
                seed=s.seed + len(s.text),
                stream=True,
                stream_options={"include_usage": True},
                **self.generation_settings(),
            )
            reader = StepReader(self._stream(body), StepSplitter(stop, max_tokens, text=s.partial), self.ended_at_eos)
            try:
                while not reader.over and written < max_steps:
                    async with self._guarded("streamed steps", self.step_deadline_s):
                        try:
                            steps = await reader.next_steps()
                        except ValueError as e:
                            raise self._fail("streamed completion", str(e)) from e
                    for out in steps[: max_steps - written]:
                        _close_step(s, out.text, eos=out.eos, stop=stop)
                        written += 1
                        yield out
            finally:
                with anyio.move_on_after(1, shield=True):  # close the response even when cancelled
                    await reader.aclose()

    async def score(self, session: ChatSession, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        s = session
        candidate = text + stop
        if judge is None:
            logprobs, agreed = await self.likelihood(s, text, stop)
            p_pos = p_neg = 0.0
        else:
            body = await self._body(
                s,
                s.text + candidate + judge.suffix,
                max_tokens=1,
                temperature=0.0,
                logprobs=True,
                top_logprobs=TOP_LOGPROBS,
            )
            p_pos, p_neg = self._verdict(await self._post(body), judge)
            logprobs, agreed = [], None
        s.text += candidate
        s.partial = ""
        s.finished = False
        return ScoreOutput(p_pos, p_neg, logprobs, n_tokens=len(candidate), forwards=1, agreed=agreed)

    def _verdict(self, data: dict[str, Any], judge: JudgeTemplate) -> tuple[float, float]:
        try:
            tops = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            probs = {t["token"]: math.exp(float(t["logprob"])) for t in tops}
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise self._fail("judge scoring", f"no top_logprobs in {str(data)[:200]!r}") from e
        return probs.get(judge.positive, 0.0), probs.get(judge.negative, 0.0)

    async def append(self, session: ChatSession, text: str, *, stop: str) -> int:
        session.text += text + stop
        session.partial = ""
        session.finished = False
        return len(text) + len(stop)

    async def rollback(self, session: ChatSession, n_tokens: int) -> None:
        if n_tokens < 0 or n_tokens > len(session.text):
            raise self.error(f"{self.name}: cannot roll back {n_tokens} characters of {len(session.text)}")
        if n_tokens:
            session.text = session.text[:-n_tokens]
        session.partial = ""
        session.finished = False

    async def begin_step(self, session: ChatSession, text: str, *, proposal: str = "") -> int:
        """No server call: the kept ``text`` goes with the continuation's request, in the
        server's prefix cache, so no forward (or token count) is known here: returns 0.
        ``proposal`` is not sent: a server speculates (or not) as it was started to."""
        session.partial = text
        return 0

    async def fork(self, session: ChatSession) -> ChatSession:
        return replace(session)

    def close(self, session: ChatSession) -> None:
        """Nothing to free: the server keeps no per-session state."""
        return None
