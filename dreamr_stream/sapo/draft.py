"""What SAPO asks of the draft it trains (``DraftPolicy``), and that draft on the engine's
Transformers backend (``TransformersDraft``).

The target's side is ``rollouts.StepScorer``: evidence on candidate steps, which any backend that
gives log-probs of a step can offer. The draft's side is the policy itself: a trainable module
whose forward gives next-token logits (the update's log-probs of a step and the frozen KL
reference, a copy of it), batched sampling of a step at a prefix, the tokens of a text, and the
draft as the engine runs it (validation decodes its greedy steps through the engine's own calls,
so what is measured is what FPSR runs). Nothing else of a backend is reached for, so a backend
that offers these trains under SAPO unchanged.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from dreamr_stream.backends.base import ModelBackend
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import GenerationConfig
from dreamr_stream.sapo.config import DEFAULT_GENERATION
from dreamr_stream.sapo.policy import batch_inputs

__all__ = ["DraftPolicy", "Encoder", "SampledStep", "StepSampling", "TransformersDraft"]

# a sampled step: (token ids as the session would hold them: the step, then the delimiter or the
# end-of-answer token; its text; whether it ended the answer)
SampledStep = tuple[list[int], str, bool]


@dataclass(frozen=True)
class StepSampling:
    """How the steps of a group are sampled, by the engine's step rules: at ``temperature`` (0:
    greedy), each ending at the task's step delimiter (``gen``), at the end of the answer, or
    after ``max_tokens`` with the delimiter added."""

    temperature: float
    max_tokens: int
    gen: GenerationConfig = DEFAULT_GENERATION


class Encoder(Protocol):
    """A model's tokens of a text: all that counting a step's tokens needs (a draft, or a backend)."""

    def encode(self, text: str) -> list[int]: ...


class DraftPolicy(Protocol):
    """The draft as SAPO trains it. Token ids are the draft's own throughout; text crosses to
    the target (``StepScorer``), which may tokenise differently."""

    @property
    def module(self) -> torch.nn.Module:
        """What the update trains: ``module(**prompt_tensors, input_ids=..., attention_mask=...)``
        returns an output whose ``.logits`` are (batch, length, vocab) next-token logits
        (``policy.step_logprobs``). The KL reference is a frozen copy of it."""
        ...

    @property
    def pad_id(self) -> int:
        """The id that pads rows of a batched forward (masked out, so any id will do)."""
        ...

    @property
    def end_id(self) -> int:
        """The token that ends the answer, as a trajectory's last step is appended with it (the
        target's trajectory as an off-policy sample, the guide step of a group)."""
        ...

    @property
    def end_ids(self) -> Collection[int]:
        """Every token that ends the answer: the engine's decode stops at any of them, so a
        greedy check of the last step accepts any of them (``trajectories.greedy_matches``)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Rows of the module's output: the target's next-token distributions teach the draft
        (the dense term) only where they have the same size."""
        ...

    @property
    def backend(self) -> ModelBackend[Any]:
        """The draft as the engine runs it: validation judges its greedy steps decoded through
        the engine's own calls (``acceptance``), not a re-implementation of them."""
        ...

    def encode(self, text: str) -> list[int]:
        """The draft's tokens of a step's text (no special tokens): a step is appended as
        ``encode(step) + encode(delimiter)``, as the engine's backend appends it."""
        ...

    def prompt_inputs(self, image: Image.Image, question: str) -> dict[str, Any]:
        """The module's tensors of the prompt (batch dimension 1), ``input_ids`` among them:
        every row of a batched forward continues them."""
        ...

    def sample_steps(
        self, inputs: dict[str, Any], context: list[int], n: int, how: StepSampling, *, seed: int
    ) -> list[SampledStep]:
        """``n`` steps sampled after the prompt ``inputs`` and the verified ``context`` (token
        ids), with the engine's step rules (``StepSampling``). The same ``seed`` gives the same
        steps. Why here and not in SAPO: fast batched sampling is the backend's to offer."""
        ...

    def save(self, folder: Path) -> None:
        """Write the trained draft to ``folder`` as the engine loads a draft (weights and what
        prepares its inputs)."""
        ...


class _StepEnd(StoppingCriteria):
    """Per-sequence stop at the step delimiter or the end of the answer (batched sampling)."""

    def __init__(self, stop_ids: list[int]) -> None:
        self.stop_ids = torch.tensor(stop_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))


class TransformersDraft:
    """``DraftPolicy`` of a Hugging Face VLM computing in this process: the engine's own backend,
    so what SAPO trains is exactly what FPSR runs. A target wrapped in it gives the same
    teacher-forced checks (``trajectories.greedy_writes``)."""

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend

    @property
    def module(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def pad_id(self) -> int:
        return int(self.backend.tokenizer.pad_token_id or 0)

    @property
    def end_id(self) -> int:
        return next(iter(self.backend.eos_ids))

    @property
    def end_ids(self) -> Collection[int]:
        return self.backend.eos_ids

    @property
    def vocab_size(self) -> int:
        return int(self.backend.model.get_output_embeddings().weight.shape[0])

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text)

    def prompt_inputs(self, image: Image.Image, question: str) -> dict[str, Any]:
        return self.backend.prompt_inputs(image, question)

    @torch.no_grad()
    def sample_steps(
        self, inputs: dict[str, Any], context: list[int], n: int, how: StepSampling, *, seed: int
    ) -> list[SampledStep]:
        """All ``n`` in ONE batched ``generate``, following the backend's decode loop (a test
        checks greedy sampling against it)."""
        draft, temperature, max_tokens = self.backend, how.temperature, how.max_tokens
        stop = draft.encode(how.gen.step_delimiter)
        eos = sorted(draft.eos_ids)
        base = inputs["input_ids"][0].tolist() + context
        # special tokens other than the end of answer never belong in a step (an image token would
        # even break the batched forward that scores it)
        special = sorted(set(draft.tokenizer.all_special_ids) - set(eos))
        torch.manual_seed(seed)  # generate() samples from the global generator
        out = draft.model.generate(
            **batch_inputs([inputs] * n, [base] * n, self.pad_id, draft.device),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=0,  # sample from the whole distribution, as the backend does
            top_p=1.0,
            max_new_tokens=max_tokens,
            stopping_criteria=StoppingCriteriaList([_StepEnd(stop[-1:] + eos)]),
            suppress_tokens=special or None,
            eos_token_id=eos,
            pad_token_id=draft.tokenizer.pad_token_id,
        )
        steps = []
        for row in out[:, len(base) :].tolist():
            ids, ended = row[:max_tokens], False
            for i, t in enumerate(ids):
                if t in eos:
                    ids, ended = ids[:i], True
                    break
                if t == stop[-1]:
                    ids = ids[:i]
                    break
            text = draft.decode(ids)
            steps.append((ids + ([eos[0]] if ended else stop), text, ended))
        return steps

    def save(self, folder: Path) -> None:
        self.backend.model.save_pretrained(folder)
        self.backend.processor.save_pretrained(folder)
