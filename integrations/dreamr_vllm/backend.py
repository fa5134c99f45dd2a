"""A model served by vLLM (or any server speaking its OpenAI-compatible chat API).

Sessions live on our side: the image (as a ``data:`` URL), the question and the assistant text
written so far. Every call re-sends the whole conversation and relies on the server's prefix
cache (``--enable-prefix-caching``) to skip what it already computed, so fork, append and
rollback are string operations and a session's ``length`` counts characters.

* ``generate_step``: one streamed chat completion that continues the assistant message and stops
  at the step delimiter, EOS or ``max_tokens``. Cancelling it closes the stream, and vLLM aborts
  a request whose client has gone.
* ``score`` in likelihood mode: the candidate (and delimiter) appended to the assistant message,
  ``prompt_logprobs: 0`` and one token of output; the candidate's token log-probs are the last
  prompt positions. vLLM computes prompt log-probs without its prefix cache.
* ``score`` in judge mode: the judge suffix appended too, one output token with ``top_logprobs``;
  the verdict probabilities are read from them. This request does use the prefix cache.

The delimiter's own tokens are never evidence: after the final step ("Answer: N") the target
writes EOS, not a delimiter, so the delimiter is improbable there (the in-process backend reads
the same positions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
from PIL import Image

from dreamr_stream.backends.base import ScoreOutput, StepOutput
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError, ModelLoadError
from dreamr_stream.store import image_png

__all__ = ["VLLMBackend", "VLLMError", "VLLMSession"]

log = logging.getLogger(__name__)
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs; verdict tokens outside the top 20 count as 0


class VLLMError(BackendError):
    """The server could not be reached, failed, or answered something we cannot read."""


@dataclass
class VLLMSession:
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


class VLLMBackend:
    """An ``AsyncModelBackend`` over a vLLM server's ``/v1/chat/completions``.

    ``url`` is the API base (``http://host:8000/v1``); ``model`` the served model name (default:
    the only one the server lists). ``judge`` and ``recommended_verification`` play the role of
    a local model folder's ``dreamr.json`` (``settings_from`` reads them from one).
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        name: str = "model",
        judge: JudgeTemplate | None = None,
        recommended_verification: dict[str, Any] | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 256,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport``: replaces the pooled HTTP transport (``httpx.MockTransport`` in tests)."""
        if not url.startswith(("http://", "https://")):
            raise ModelLoadError(f"not a server URL: {url!r} (expected http://host:port/v1)")
        self.url = url.rstrip("/")
        self.model = model
        self.name = name
        self.judge = judge or JudgeTemplate()
        self.recommended_verification = dict(recommended_verification or {})
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        # one client per event loop: a pooled connection belongs to the loop that opened it
        self._clients: dict[int, httpx.AsyncClient] = {}

    @classmethod
    def connect(
        cls, url: str, *, settings_from: str | Path | None = None, name: str = "model", **kwargs: Any
    ) -> VLLMBackend:
        """A backend whose judge template and recommended verification come from a local model
        folder's ``dreamr.json`` (e.g. the folder the server was started on)."""
        if settings_from is not None:
            sidecar = Path(settings_from) / "dreamr.json"
            if sidecar.exists():
                settings = json.loads(sidecar.read_text())
                kwargs.setdefault("judge", JudgeTemplate(**settings.get("judge", {})))
                kwargs.setdefault("recommended_verification", settings.get("verification", {}))
        return cls(url, name=name, **kwargs)

    @property
    def cpu_threads(self) -> int:
        """A server on loopback computes on this machine's cores: counting them makes a draft on
        the same CPU take only its share (``engine.threads``); 0 for a server elsewhere."""
        host = httpx.URL(self.url).host
        return len(os.sched_getaffinity(0)) if host in ("127.0.0.1", "localhost", "::1") else 0

    def use_threads(self, n: int) -> None:
        """The server sets its own threads (``VLLM_CPU_OMP_THREADS_BIND``)."""

    @property
    def identity(self) -> str:
        """Cache-key identity: the same server and model give the same trajectories."""
        return f"vllm:{self.url}:{self.model or '?'}"

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

    def _fail(self, what: str, e: BaseException | str) -> VLLMError:
        detail = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else e
        return VLLMError(f"{self.name}: {what} at {self.url} failed: {detail}")

    async def resolve_model(self) -> str:
        """The served model name (asks ``/models`` once when none was given)."""
        if self.model is None:
            data = await self._get_json("/models")
            try:
                names = [m["id"] for m in data["data"]]
            except (KeyError, TypeError) as e:
                raise self._fail("GET /models", f"unexpected answer {str(data)[:200]!r}") from e
            if len(names) != 1:
                raise VLLMError(f"{self.name}: {self.url} serves {names}; pass model= to choose one")
            self.model = names[0]
        return self.model

    async def _get_json(self, path: str) -> Any:
        try:
            r = await self._client().get(self.url + path)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise self._fail(f"GET {path}", e) from e

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self._client().post(self.url + "/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise self._fail("POST /chat/completions", e) from e
        if r.status_code != 200:
            raise self._fail("POST /chat/completions", f"HTTP {r.status_code}: {r.text[:300]}")
        try:
            data = r.json()
        except ValueError as e:
            raise self._fail("POST /chat/completions", f"not JSON: {r.text[:200]!r}") from e
        if not isinstance(data, dict) or not data.get("choices"):
            raise self._fail("POST /chat/completions", f"no choices in {r.text[:200]!r}")
        return data

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Server-sent events of a streamed completion, as parsed JSON chunks.

        The SSE framing vLLM uses is ``data: <json>`` lines ending with ``data: [DONE]``;
        parsing that takes a few lines, so no SSE library is pulled in for it. Leaving the
        iterator early (cancellation) closes the response, which aborts the server's request.
        """
        try:
            async with self._client().stream("POST", self.url + "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    raise self._fail("POST /chat/completions", f"HTTP {r.status_code}: {text[:300]}")
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

    async def _body(self, session: VLLMSession, assistant: str, **params: Any) -> dict[str, Any]:
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
            params |= {"add_generation_prompt": False, "continue_final_message": True}
        else:
            params |= {"add_generation_prompt": True}
        return {"model": await self.resolve_model(), "messages": messages, **params}

    # ------------------------------------------------------------------ sessions
    async def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> VLLMSession:
        png = await anyio.to_thread.run_sync(image_png, image)
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        await self.resolve_model()
        return VLLMSession(image_url=url, question=question, seed=seed)

    async def generate_step(
        self,
        session: VLLMSession,
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
            skip_special_tokens=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        finish: str | None = None
        stop_reason: Any = None
        tokens = 0
        async for chunk in self._stream(body):
            usage = chunk.get("usage")
            if usage:
                tokens = int(usage.get("completion_tokens") or tokens)
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                parts.append(delta.get("content") or "")
                if choice.get("finish_reason"):
                    finish, stop_reason = choice["finish_reason"], choice.get("stop_reason")
        if finish is None:
            raise self._fail("streamed completion", "the stream ended without a finish reason")
        text = begun + "".join(parts)
        s.partial = ""
        if finish == "stop" and stop_reason is None:  # the model's end of sequence
            s.text += text
            s.finished = True
            return StepOutput(text, done=True, eos=True, new_tokens=tokens, forwards=tokens)
        # the delimiter, or the step cap (which ends the step with a delimiter, as in-process)
        s.text += text + stop
        return StepOutput(text, done=True, new_tokens=tokens, forwards=tokens)

    async def score(self, session: VLLMSession, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        s = session
        candidate = text + stop
        if judge is None:
            # prompt_logprobs=1: each position's own token (with its rank) and the greedy one
            body = await self._body(s, s.text + candidate, max_tokens=1, temperature=0.0, prompt_logprobs=1)
            data = await self._post(body)
            logprobs, agreed = self._candidate_evidence(data, text, stop)
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
            data = await self._post(body)
            p_pos, p_neg = self._verdict(data, judge)
            logprobs, agreed = [], None
        s.text += candidate
        s.partial = ""
        s.finished = False
        return ScoreOutput(p_pos, p_neg, logprobs, n_tokens=len(candidate), forwards=1, agreed=agreed)

    def _candidate_evidence(self, data: dict[str, Any], text: str, stop: str) -> tuple[list[float], str]:
        """The candidate's token log-probs and its greedy-agreed start, from the last prompt
        positions (found by walking back over their decoded text until the candidate and the
        delimiter are covered). Each position holds its own token, and the greedy token too
        when that differs (then the own token's rank is above 1)."""
        positions = data.get("prompt_logprobs")
        if not isinstance(positions, list) or not positions:
            raise self._fail("likelihood scoring", "the answer has no prompt_logprobs (is this a vLLM server?)")
        tokens: list[tuple[str, float, bool]] = []  # (decoded, logprob, greedy) from the end
        covered = 0
        for entry in reversed(positions):
            if covered >= len(text) + len(stop) or not isinstance(entry, dict) or not entry:
                break
            try:
                own = max(entry.values(), key=lambda info: int(info.get("rank") or 1))
                piece, logprob, greedy = str(own.get("decoded_token") or ""), float(own["logprob"]), len(entry) == 1
            except (KeyError, TypeError, ValueError) as e:
                raise self._fail("likelihood scoring", f"unreadable prompt log-prob {entry!r}") from e
            tokens.append((piece, logprob, greedy))
            covered += len(piece)
        tokens.reverse()
        overshoot = covered - len(text) - len(stop)  # the first token may start in the prefix
        if tokens and overshoot > 0:
            tokens[0] = (tokens[0][0][overshoot:], *tokens[0][1:])
        # the delimiter's tokens (at the end) are not evidence
        n_text, tail = len(tokens), 0
        while n_text and tail < len(stop):
            n_text -= 1
            tail += len(tokens[n_text][0])
        if n_text == 0 and text:
            raise self._fail("likelihood scoring", "could not find the candidate's tokens in the prompt log-probs")
        agreed: list[str] = []
        for piece, _, greedy in tokens[:n_text]:
            if not greedy:
                break
            agreed.append(piece)
        agreed_text = "".join(agreed)
        return [lp for _, lp, _ in tokens[:n_text]], agreed_text if text.startswith(agreed_text) else ""

    def _verdict(self, data: dict[str, Any], judge: JudgeTemplate) -> tuple[float, float]:
        try:
            tops = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            probs = {t["token"]: math.exp(float(t["logprob"])) for t in tops}
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise self._fail("judge scoring", f"no top_logprobs in {str(data)[:200]!r}") from e
        return probs.get(judge.positive, 0.0), probs.get(judge.negative, 0.0)

    async def append(self, session: VLLMSession, text: str, *, stop: str) -> int:
        session.text += text + stop
        session.partial = ""
        session.finished = False
        return len(text) + len(stop)

    async def rollback(self, session: VLLMSession, n_tokens: int) -> None:
        if n_tokens < 0 or n_tokens > len(session.text):
            raise VLLMError(f"{self.name}: cannot roll back {n_tokens} characters of {len(session.text)}")
        if n_tokens:
            session.text = session.text[:-n_tokens]
        session.partial = ""
        session.finished = False

    async def begin_step(self, session: VLLMSession, text: str, *, proposal: str = "") -> int:
        """No server call: the kept ``text`` goes with the continuation's request, in the
        server's prefix cache, so no forward (or token count) is known here: returns 0.
        ``proposal`` is not sent: a server speculates (or not) as it was started to."""
        session.partial = text
        return 0

    async def fork(self, session: VLLMSession) -> VLLMSession:
        return replace(session)

    def close(self, session: VLLMSession) -> None:
        """Nothing to free: the server keeps no per-session state."""
