"""Transformers backend for image-text-to-text models (LLaVA, Idefics3, Qwen2-VL, Qwen2.5-VL).

Each request gets an ``HFSession`` holding its own ``DynamicCache``, the token ids in it and
the logits that predict the next token. Decoding is a hand-written cached loop (one forward
per token, no ``generate()`` overhead). Qwen2-VL-family models keep ``rope_deltas`` on the
model object, so sessions compute and pass their own 3-D ``position_ids`` on every forward:
two sessions on one model never see each other's positions.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache, PreTrainedModel

from dreamr_stream.backends.base import Capabilities, ScoreOutput, StepCall, StepOutput
from dreamr_stream.backends.hf_batch import DEFAULT_BATCH_ROWS, generate_rows, plain_decoder
from dreamr_stream.backends.settings import read_settings
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError, ModelLoadError

__all__ = ["HFSession", "TransformersBackend", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class HFSession:
    cache: DynamicCache
    ids: list[int]
    prompt_len: int
    # logits predicting the token after ids[:n], for the lengths n we know them (step boundaries)
    logits_at: dict[int, torch.Tensor]
    rope_deltas: torch.Tensor | None = None  # (1, 1) for Qwen2-VL-style models
    pos_dims: int = 0
    partial: list[int] = field(default_factory=list)  # tokens of the step being decoded
    inputs: dict[str, Any] = field(default_factory=dict)  # the processor's prompt tensors
    finished: bool = False  # the answer has ended (the Session protocol's flag, written here)
    generator: torch.Generator | None = None
    # tokens proposed for the rest of the step under way (``begin_step``), verified several per
    # forward; ``proposal_at`` is where the next token is expected in them
    proposal: list[int] = field(default_factory=list)
    proposal_at: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)


class TransformersBackend:
    """A ModelBackend over a local Hugging Face VLM folder."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: Any,
        *,
        name: str = "model",
        judge: JudgeTemplate | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._plain_decode = plain_decoder(self.tokenizer)
        self.name = name
        self.judge = judge or JudgeTemplate()
        self.device = next(model.parameters()).device
        self.eos_ids = self._eos_ids()
        self._uses_mrope = hasattr(getattr(model, "model", model), "get_rope_index")
        self._identity: str | None = None
        # what the model folder's dreamr.json says (backends.settings): the verification it
        # recommends and the task it was trained on
        self.recommended_verification: dict[str, Any] = {}
        self.task: str | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # the most steps ``generate_batch`` decodes together (``Capabilities.batches``; 0: none)
        self.batch_rows = DEFAULT_BATCH_ROWS
        self.verdict_ids(self.judge)  # fail at load, not mid-request, on a bad template

    @property
    def capabilities(self) -> Capabilities:
        """Blocking calls in this process, repairs, both evidence kinds, batched steps (up to
        ``batch_rows`` rows); identity hashed on first read."""
        return Capabilities(
            identity=lambda: self.identity,
            device=str(self.device),
            repair=True,
            cpu_threads=self.cpu_threads,
            sets_threads=True,
            recommended_verification=self.recommended_verification,
            task=self.task,
            batches=self.batch_rows,
        )

    @property
    def cpu_threads(self) -> int:
        """Intra-op threads this backend's calls may use (0: not on the CPU, nothing to share)."""
        return torch.get_num_threads() if self.device.type == "cpu" else 0

    @staticmethod
    def use_threads(n: int) -> None:
        """Run this thread's torch ops on ``n`` intra-op threads (a per-thread setting; set only
        when it changes, since resizing the thread pools is not free)."""
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    @property
    def identity(self) -> str:
        """Stable id of these weights (config + first and last tensors) for cache keys."""
        if self._identity is None:
            h = hashlib.sha256(self.model.config.to_json_string().encode())
            params = list(self.model.parameters())
            for p in (params[0], params[-1]):
                h.update(p.detach().float().cpu().numpy().tobytes())
            self._identity = h.hexdigest()[:16]
        return self._identity

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None, name: str | None = None
    ) -> TransformersBackend:
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"no model folder at {folder} (downloads are not supported: pass a local folder)")
        settings = read_settings(folder)  # a malformed dreamr.json fails before the weights load
        dev = resolve_device(device)
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        try:
            processor = AutoProcessor.from_pretrained(folder)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device=dev)  # type: ignore[call-arg]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"could not load a vision-language model from {folder}: {e}") from e
        backend = cls(model, processor, name=name or folder.name, judge=settings.judge)
        backend.recommended_verification = dict(settings.verification)
        backend.task = settings.task
        return backend

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return ids

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def verdict_ids(self, judge: JudgeTemplate) -> tuple[int, int]:
        out = []
        for word in (judge.positive, judge.negative):
            ids = self.encode(word)
            if len(ids) != 1:
                raise ModelLoadError(
                    f"{self.name}: judge verdict {word!r} is {len(ids)} tokens; verdicts must be single tokens"
                )
            out.append(ids[0])
        return out[0], out[1]

    # ------------------------------------------------------------------ forwards
    def _run(self, fn: Any, *args: Any) -> Any:
        try:
            with torch.inference_mode():
                if self._stream is None:
                    return fn(*args)
                with torch.cuda.stream(self._stream):  # draft and target kernels overlap on a GPU
                    result = fn(*args)
                self._stream.synchronize()
                return result
        except BackendError:
            raise
        except (RuntimeError, ValueError, IndexError) as e:
            raise BackendError(f"{self.name}: model call failed: {e}") from e

    def _positions(self, s: HFSession, start: int, n: int) -> torch.Tensor | None:
        if s.rope_deltas is None:
            return None
        pos = torch.arange(start, start + n, device=self.device).view(1, 1, -1).expand(s.pos_dims, 1, -1)
        return pos + s.rope_deltas.to(self.device)

    def _forward(self, s: HFSession, new_ids: list[int]) -> torch.Tensor:
        """Feed tokens after the cache; returns their logits, shape (len(new_ids), vocab)."""
        start = s.cache.get_seq_length()
        input_ids = torch.tensor([new_ids], device=self.device)
        kwargs: dict[str, Any] = {}
        pos = self._positions(s, start, len(new_ids))
        if pos is not None:
            kwargs["position_ids"] = pos
        out = self.model(input_ids=input_ids, cache=s.cache, use_cache=True, **kwargs)
        s.ids.extend(new_ids)
        logits = out.logits[0].float()
        s.logits_at[len(s.ids)] = logits[-1]
        return logits

    # ------------------------------------------------------------------ sessions
    def prompt_inputs(self, image: Image.Image, question: str) -> dict[str, Any]:
        """The processor's tensors for the chat prompt (image + question, generation prompt)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> HFSession:
        def prefill() -> HFSession:
            inputs = self.prompt_inputs(image, question)
            ids = inputs["input_ids"][0].tolist()
            s = HFSession(cache=DynamicCache(config=self.model.config), ids=[], prompt_len=len(ids), logits_at={})
            if self._uses_mrope:
                rope_args = {
                    k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids", "attention_mask") if k in inputs
                }
                position_ids, deltas = self.model.model.get_rope_index(inputs["input_ids"], **rope_args)
                inputs["position_ids"] = position_ids
                s.rope_deltas, s.pos_dims = deltas.view(1, 1, -1)[..., :1], position_ids.shape[0]
            out = self.model(**inputs, cache=s.cache, use_cache=True)
            s.ids = ids
            s.logits_at[len(ids)] = out.logits[0, -1].float()
            s.generator = torch.Generator(device="cpu").manual_seed(seed)
            s.inputs = inputs
            return s

        return self._run(prefill)

    def _pick(self, s: HFSession, logits: torch.Tensor, temperature: float) -> int:
        if temperature <= 0.0:
            return int(logits.argmax())
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=s.generator))

    def generate_step(
        self,
        session: HFSession,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
    ) -> StepOutput:
        s = session

        def steps() -> StepOutput:
            if s.partial and len(s.partial) >= max_tokens:  # a begun step already at the cap
                text = self.decode(s.partial)
                self._forward(s, self.encode(stop))
                return self._end_step(s, StepOutput(text, done=True, forwards=1))
            forwards = new = proposed = 0
            while budget is None or new < budget:
                if s.finished:
                    text = self.decode(s.partial)
                    return self._end_step(s, StepOutput(text, True, True, new, forwards, proposed))
                token = self._pick(s, s.logits_at[len(s.ids)], temperature)
                if token in self.eos_ids:
                    s.finished = True  # not fed: nothing follows the end of the answer
                    text = self.decode(s.partial)
                    return self._end_step(s, StepOutput(text, True, True, new + 1, forwards, proposed))
                guesses = self._guesses(s, token, max_tokens - len(s.partial) - 1) if temperature <= 0.0 else []
                tokens = self._verify(s, token, guesses)
                forwards += 1
                for j, tok in enumerate(tokens):
                    new += 1
                    proposed += j > 0
                    s.partial.append(tok)
                    text = self.decode(s.partial)
                    if stop in text or len(s.partial) >= max_tokens:
                        self._crop(s, len(s.ids) - (len(tokens) - 1 - j))  # tokens past the step's end
                        return self._close_step(s, text, stop, new, forwards, proposed)
            return StepOutput(self.decode(s.partial), False, False, new, forwards, proposed)

        return self._run(steps)

    def generate_batch(self, calls: list[StepCall]) -> list[StepOutput]:
        """Several ``generate_step`` calls decoded together, one forward per token for all of them
        (``backends.hf_batch``); each output, and each session after it, is what ``generate_step``
        alone would have given. Rows that cannot join (``hf_batch.batchable``: sampling, mrope
        positions, a pending proposal, ...) run alone, after the batch."""

        def alone(c: StepCall) -> StepOutput:
            return self.generate_step(
                c.session, max_tokens=c.max_tokens, stop=c.stop, temperature=c.temperature, budget=c.budget
            )

        def run() -> list[StepOutput]:
            return generate_rows(
                calls,
                self.model,
                eos_ids=self.eos_ids,
                decode=self.decode,
                close_step=self._close_step,
                end_step=self._end_step,
                alone=alone,
            )

        return self._run(run)  # type: ignore[no-any-return]

    def _close_step(self, s: HFSession, text: str, stop: str, new: int, forwards: int, proposed: int) -> StepOutput:
        """End the step whose last kept token made ``text``: at its delimiter (the cache made
        canonical) or at the step cap (a delimiter fed after it)."""
        if stop in text:
            forwards += self._canonicalise(s, text, stop)
            text = text[: text.index(stop)]
        else:  # step cap: end the step with a delimiter
            self._forward(s, self.encode(stop))
            forwards += 1
        return self._end_step(s, StepOutput(text, True, False, new, forwards, proposed))

    @staticmethod
    def _end_step(s: HFSession, out: StepOutput) -> StepOutput:
        s.partial = []
        s.proposal, s.proposal_at = [], 0
        return out

    @staticmethod
    def _guesses(s: HFSession, token: int, limit: int) -> list[int]:
        """The proposal's tokens expected after ``token``, the model's next one.

        The proposal is a rejected step's rest; the model departs from it where it corrects the
        step. Where ``token`` is not the expected one it replaces it (a substitution, e.g. a
        corrected count), or, when it equals the one after, the expected token was dropped.
        """
        S, p = s.proposal, s.proposal_at
        if p >= len(S) or limit <= 0:
            return []
        if S[p] == token or p + 1 >= len(S) or S[p + 1] != token:
            p += 1  # matched, or substituted
        else:
            p += 2  # S[p] dropped
        s.proposal_at = p
        return S[p : p + limit]

    def _verify(self, s: HFSession, token: int, guesses: list[int]) -> list[int]:
        """Feed ``token`` and the guessed tokens after it in one forward; keep ``token`` and the
        longest run of guesses that are each the model's greedy choice (speculative decoding,
        exact for greedy decoding). Returns the kept tokens; the cache holds exactly them."""
        logits = self._forward(s, [token, *guesses])
        if not guesses:
            return [token]
        greedy = logits[: len(guesses)].argmax(-1).tolist()
        m = 0
        while m < len(guesses) and greedy[m] == guesses[m] and guesses[m] not in self.eos_ids:
            m += 1
        s.proposal_at += m
        before = len(s.ids) - len(guesses) - 1
        self._crop(s, len(s.ids) - (len(guesses) - m))
        for j in range(m + 1):  # the logits after each kept token: a step may end at any of them
            s.logits_at[before + 1 + j] = logits[j]
        return [token, *guesses[:m]]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, special tokens kept (``encode``'s inverse on a step's tokens)."""
        if self._plain_decode is not None:  # the same, called more directly (``hf_batch.plain_decoder``)
            return self._plain_decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _canonicalise(self, s: HFSession, text: str, stop: str) -> int:
        """If the delimiter arrived inside a token with more text after it, re-append the step
        as ``tok(step) + tok(stop)`` so the cache never holds text past the delimiter."""
        if text.endswith(stop) and text.count(stop) == 1:
            return 0
        step = text[: text.index(stop)]
        self._crop(s, len(s.ids) - len(s.partial))
        self._ensure_logits(s)
        self._forward(s, self.encode(step) + self.encode(stop))
        return 1

    def score(
        self,
        session: HFSession,
        text: str,
        *,
        stop: str,
        judge: JudgeTemplate | None,
    ) -> ScoreOutput:
        s = session
        if s.partial:
            raise BackendError(f"{self.name}: cannot score while a step is half-decoded; roll it back first")
        text_ids = self.encode(text)
        candidate = text_ids + self.encode(stop)
        suffix = self.encode(judge.suffix) if judge is not None else []
        pos_id, neg_id = self.verdict_ids(judge) if judge is not None else (0, 0)

        def forward() -> ScoreOutput:
            self._ensure_logits(s)
            before = len(s.ids)
            first = s.logits_at[before]  # predicts candidate[0]
            logits = self._forward(s, candidate + suffix)
            # log p(candidate[i] | prefix, candidate[:i]) from [first, logits[0..n-2]]: (n, vocab)
            n = len(candidate)
            preds = torch.cat([first[None], logits[: n - 1]], dim=0)
            ids = torch.tensor(candidate, device=preds.device)
            logprobs = torch.log_softmax(preds, dim=-1).gather(1, ids[:, None])
            # the candidate's start that is this model's own greedy choice, token by token
            differs = (preds.argmax(-1) != ids)[: len(text_ids)].nonzero()
            agreed = len(text_ids) if len(differs) == 0 else int(differs[0])
            p_pos = p_neg = 0.0
            if suffix:
                probs = torch.softmax(logits[-1], dim=-1)
                p_pos, p_neg = float(probs[pos_id]), float(probs[neg_id])
                self._crop(s, before + n)  # drop the judge suffix, keep the candidate
                s.logits_at[before + n] = logits[n - 1]
            return ScoreOutput(
                p_pos,
                p_neg,
                logprobs[:, 0].tolist()[: len(text_ids)],
                n_tokens=n,
                agreed=self.decode(text_ids[:agreed]),
            )

        return self._run(forward)

    def begin_step(self, session: HFSession, text: str, *, proposal: str = "") -> int:
        """Start the next step with ``text``: ``generate_step`` continues it (repairs a step).

        ``proposal`` guesses the rest of the step (a rejected draft's rest): with greedy decoding
        the continuation checks it several tokens per forward and keeps only the model's own
        choices, so the step is the same, only cheaper. Returns the tokens fed (``text``'s).
        """
        s = session
        ids = self.encode(text) if text else []

        def forward() -> int:
            if s.partial:
                raise BackendError(f"{self.name}: a step is already under way; roll it back first")
            if ids:
                self._ensure_logits(s)
                self._forward(s, ids)
                s.partial = list(ids)
            s.proposal, s.proposal_at = (self.encode(proposal) if proposal else []), 0
            return len(ids)

        return self._run(forward)  # type: ignore[no-any-return]

    def append(self, session: HFSession, text: str, *, stop: str) -> int:
        s = session
        ids = self.encode(text) + self.encode(stop)

        def forward() -> int:
            self._ensure_logits(s)
            self._forward(s, ids)
            return len(ids)

        return self._run(forward)

    def rollback(self, session: HFSession, n_tokens: int) -> None:
        s = session
        if n_tokens < 0 or n_tokens > len(s.ids) - s.prompt_len:
            raise BackendError(f"{self.name}: cannot roll back {n_tokens} tokens past the prompt")
        s.partial = []
        s.proposal, s.proposal_at = [], 0
        s.finished = False
        self._run(self._crop, s, len(s.ids) - n_tokens)

    def _crop(self, s: HFSession, length: int) -> None:
        if length < len(s.ids):
            s.cache.crop(length - len(s.ids))  # transformers 5: a negative count drops tokens
            del s.ids[length:]
        for n in [n for n in s.logits_at if n > length]:
            del s.logits_at[n]

    def _ensure_logits(self, s: HFSession) -> None:
        """After a rollback to a length whose logits we never kept, recompute them (1 forward)."""
        if len(s.ids) in s.logits_at:
            return
        last = s.ids[-1]
        self._crop(s, len(s.ids) - 1)
        self._forward(s, [last])

    def fork(self, session: HFSession) -> HFSession:
        s = session
        return HFSession(
            cache=copy.deepcopy(s.cache),
            ids=list(s.ids),
            prompt_len=s.prompt_len,
            logits_at=dict(s.logits_at),
            rope_deltas=s.rope_deltas,
            pos_dims=s.pos_dims,
            partial=list(s.partial),
            finished=s.finished,
            proposal=list(s.proposal),
            proposal_at=s.proposal_at,
            inputs=s.inputs,
            generator=copy.deepcopy(s.generator),
        )

    def close(self, session: HFSession) -> None:
        session.cache = DynamicCache()
        session.logits_at.clear()

    def reference_logits(self, session: HFSession) -> torch.Tensor:
        """Logits of a fresh, uncached forward over the session's tokens: (length, vocab).

        The ground truth for cache invariants (rollback, interleaving) in tests and debugging.
        """
        s = session

        def forward() -> torch.Tensor:
            inputs = dict(s.inputs)
            inputs["input_ids"] = torch.tensor([s.ids], device=self.device)
            for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
                if key in inputs:
                    pad = torch.zeros(
                        (1, len(s.ids) - inputs[key].shape[1]), dtype=inputs[key].dtype, device=self.device
                    )
                    fill = pad + 1 if key == "attention_mask" else pad
                    inputs[key] = torch.cat([inputs[key], fill], dim=1)
            if self._uses_mrope:
                rope_args = {
                    k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids", "attention_mask") if k in inputs
                }
                inputs["position_ids"], _ = self.model.model.get_rope_index(inputs["input_ids"], **rope_args)
            return self.model(**inputs, use_cache=False).logits[0].float()

        return self._run(forward)
