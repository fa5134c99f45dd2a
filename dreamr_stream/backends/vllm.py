"""A model served by vLLM: its dialect of the OpenAI-compatible chat API.

What is vLLM's own, on top of ``backends.openai_compat``:

* continuing the assistant's message: ``add_generation_prompt: false,
  continue_final_message: true`` (``add_generation_prompt: true`` opens the answer);
* the model's end of sequence: a ``stop`` finish without a ``stop_reason`` (which names the stop
  string that ended a step);
* likelihood evidence: the candidate (and delimiter) appended to the assistant message,
  ``prompt_logprobs: 1`` and one token of output; the candidate's token log-probs and the
  model's greedy tokens are at the last prompt positions. vLLM computes prompt log-probs
  without its prefix cache. The delimiter's own tokens are never evidence: after the final step
  ("Answer: N") the target writes EOS, not a delimiter, so the delimiter is improbable there
  (the in-process backend reads the same positions).

Why this dialect is in the core and not in the ``dreamr_vllm`` integration: a URL given to
``Reasoner.from_pretrained`` is opened by ``backends.registry``, and the core imports no
integration. The dialect is small and needs nothing of vLLM's (only ``httpx``, the ``vllm``
extra); ``dreamr_vllm`` keeps what does need vLLM (its server launcher and the load bench) and
re-exports this backend under its old name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from dreamr_stream.backends.base import EvidenceKind
from dreamr_stream.backends.openai_compat import ChatSession, OpenAICompatBackend, ServedModelError

__all__ = ["VLLMBackend", "VLLMError", "VLLMSession"]

VLLMSession = ChatSession  # the name a vLLM session had before the OpenAI-compatible base


class VLLMError(ServedModelError):
    """The vLLM server could not be reached, failed, or answered something we cannot read."""


class VLLMBackend(OpenAICompatBackend):
    """An ``AsyncModelBackend`` over a vLLM server's ``/v1/chat/completions``
    (``OpenAICompatBackend`` for the arguments; both evidence kinds)."""

    kind: ClassVar[str] = "vllm"
    error: ClassVar[type[ServedModelError]] = VLLMError
    evidence: ClassVar[frozenset[EvidenceKind]] = frozenset({"judge", "likelihood"})

    def continuation(self, continuing: bool) -> dict[str, Any]:
        if continuing:
            return {"add_generation_prompt": False, "continue_final_message": True}
        return {"add_generation_prompt": True}

    def ended_at_eos(self, choice: Mapping[str, Any]) -> bool:
        return choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None

    def generation_settings(self) -> dict[str, Any]:
        return {"skip_special_tokens": True}

    async def likelihood(self, session: ChatSession, text: str, stop: str) -> tuple[list[float], str | None]:
        # prompt_logprobs=1: each position's own token (with its rank) and the greedy one
        body = await self._body(session, session.text + text + stop, max_tokens=1, temperature=0.0, prompt_logprobs=1)
        return self._candidate_evidence(await self._post(body), text, stop)

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
