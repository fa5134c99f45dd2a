"""SAPO asks of the draft it trains only ``DraftPolicy``: a toy byte-level policy that is no
Transformers model (its own sampling, its own decode loop for the engine's calls) runs a rollout
group with the dense term, an update with the anchor term, the greedy check and the validation."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dreamr_stream.backends.base import Capabilities, ScoreOutput, StepOutput
from dreamr_stream.config import GenerationConfig, JudgeTemplate
from dreamr_stream.sapo.acceptance import acceptance_at_prefixes
from dreamr_stream.sapo.draft import DraftPolicy, SampledStep, StepSampling
from dreamr_stream.sapo.policy import batch_inputs, step_logprobs
from dreamr_stream.sapo.rewards import RewardWeights, group_advantages
from dreamr_stream.sapo.rollouts import RolloutPrompt, StepScore, rollout_group, trajectory_sample
from dreamr_stream.sapo.trainer import sapo_update
from dreamr_stream.sapo.trajectories import greedy_matches
from dreamr_stream.verify import LikelihoodVerifier

PAD, END, BOS = 256, 257, 258  # after the 256 byte tokens
VOCAB = 259
CPU = torch.device("cpu")


@dataclass
class _Logits:
    logits: torch.Tensor


class ByteModel(torch.nn.Module):
    """Next-byte logits from the running mean of the byte embeddings so far and the image's colour."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.see = torch.nn.Linear(3, dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> _Logits:
        x = self.embed(input_ids) * attention_mask[..., None]
        mean = x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[None, :, None]
        return _Logits(self.head(torch.tanh(mean + self.see(pixel_values)[:, None])))


@dataclass
class ByteSession:
    inputs: dict[str, Any]
    ids: list[int]
    finished: bool = False  # the answer has ended (the Session protocol's flag)
    generator: torch.Generator = field(default_factory=torch.Generator)

    @property
    def length(self) -> int:
        return len(self.ids)


class ByteDraft:
    """A ``DraftPolicy`` written from the protocol alone."""

    def __init__(self) -> None:
        self.module = ByteModel()
        self.pad_id, self.end_id, self.vocab_size = PAD, END, VOCAB
        self.end_ids = frozenset({END})
        self.backend = ByteBackend(self)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(t for t in ids if t < PAD).decode(errors="replace")

    def prompt_inputs(self, image: Image.Image, question: str) -> dict[str, Any]:
        ids = torch.tensor([[BOS, *self.encode(question)]])
        colour = torch.tensor([image.convert("RGB").getpixel((0, 0))], dtype=torch.float32) / 255
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": colour}

    def logprobs(self, inputs: dict[str, Any], row: list[int]) -> torch.Tensor:
        """Next-token log-probs at every position of ``row``."""
        return torch.log_softmax(self.module(**batch_inputs([inputs], [row], PAD, CPU)).logits[0], -1)

    @torch.no_grad()
    def step(self, inputs: dict[str, Any], prefix: list[int], how: StepSampling, g: torch.Generator) -> SampledStep:
        stop, ids = self.encode(how.gen.step_delimiter), list[int]()
        while len(ids) < how.max_tokens:
            lp = self.logprobs(inputs, prefix + ids)[-1]
            lp[[PAD, BOS]] = -torch.inf  # special tokens never belong in a step
            t = (
                int(lp.argmax())
                if how.temperature <= 0
                else int(torch.multinomial((lp / how.temperature).exp(), 1, generator=g))
            )
            if t == END:
                return [*ids, END], self.decode(ids), True
            if t == stop[-1]:
                break
            ids.append(t)
        return ids + stop, self.decode(ids), False

    def sample_steps(
        self, inputs: dict[str, Any], context: list[int], n: int, how: StepSampling, *, seed: int
    ) -> list[SampledStep]:
        g = torch.Generator().manual_seed(seed)
        return [self.step(inputs, inputs["input_ids"][0].tolist() + context, how, g) for _ in range(n)]

    def save(self, folder: Path) -> None:
        torch.save(self.module.state_dict(), folder / "policy.pt")


class ByteBackend:
    """The toy model as the engine runs it: sessions over the same module (draft or target)."""

    name = "bytes"
    judge = JudgeTemplate()
    capabilities = Capabilities(identity="bytes")

    def __init__(self, model: ByteDraft) -> None:
        self.model = model

    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> ByteSession:
        inputs = self.model.prompt_inputs(image, question)
        return ByteSession(inputs, inputs["input_ids"][0].tolist(), generator=torch.Generator().manual_seed(seed))

    def generate_step(
        self, session: ByteSession, *, max_tokens: int, stop: str, temperature: float = 0.0, budget: int | None = None
    ) -> StepOutput:
        how = StepSampling(temperature, max_tokens, GenerationConfig(step_delimiter=stop))
        ids, text, ended = self.model.step(session.inputs, session.ids, how, session.generator)
        session.ids += ids
        session.finished = ended
        return StepOutput(text, done=True, eos=ended, new_tokens=len(ids))

    @torch.no_grad()
    def score(self, session: ByteSession, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        cand = self.model.encode(text)
        lp = self.model.logprobs(session.inputs, session.ids + cand)
        token_lp = [float(lp[len(session.ids) - 1 + i, t]) for i, t in enumerate(cand)]
        return ScoreOutput(0.0, 0.0, token_lp, n_tokens=self.append(session, text, stop=stop))

    def append(self, session: ByteSession, text: str, *, stop: str) -> int:
        new = self.model.encode(text) + self.model.encode(stop)
        session.ids += new
        return len(new)

    def rollback(self, session: ByteSession, n_tokens: int) -> None:
        del session.ids[len(session.ids) - n_tokens :]

    def fork(self, session: ByteSession) -> ByteSession:
        return copy.deepcopy(session)

    def close(self, session: ByteSession) -> None:
        session.ids = []


class ByteScorer:
    """``StepScorer`` of a toy target: the likelihood of each step, and its next-byte distributions."""

    def __init__(self, model: ByteDraft) -> None:
        self.model = model

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text)

    @torch.no_grad()
    def score_steps(
        self, image: Image.Image, question: str, prefix: list[str], texts: list[str], *, judge: bool
    ) -> list[StepScore]:
        inputs = self.model.prompt_inputs(image, question)
        base = inputs["input_ids"][0].tolist() + [t for s in prefix for t in self.encode(s + "\n")]
        out = []
        for text in texts:
            cand = self.encode(text)
            lp = self.model.logprobs(inputs, base + cand + self.encode("\n"))[len(base) - 1 : len(base) + len(cand)]
            token_lp = [float(lp[i, t]) for i, t in enumerate(cand)]
            p = float(torch.tensor(token_lp).mean().exp()) if cand else 0.0
            out.append(StepScore(p, 1.0 - p, token_lp, lp))
        return out


STEPS = ["Row 1: red.", "Row 2: empty.", "Answer: 1"]


def _prompt() -> RolloutPrompt:
    return RolloutPrompt(Image.new("RGB", (4, 4), (200, 30, 30)), "How many red squares?", STEPS)


def test_a_draft_that_offers_the_protocol_trains_under_sapo() -> None:
    torch.manual_seed(0)
    draft: DraftPolicy = ByteDraft()  # the type check: the toy is a DraftPolicy
    target = ByteScorer(ByteDraft())
    prompt = _prompt()
    # a guided group with the dense term: every part of a group that reads the draft
    group = rollout_group(
        target,
        draft,
        prompt,
        1,
        verifier=LikelihoodVerifier(0.25, aggregate="mean"),
        guide=True,
        teach=True,
        weights=RewardWeights(),
        rng=random.Random(0),
        group_size=4,
        temperature=1.0,
        max_step_tokens=12,
    )
    assert [s.meta["guide"] for s in group] == [False] * 4 + [True]
    assert [s.advantage for s in group] == pytest.approx(group_advantages([s.meta["reward"] for s in group]))
    guide = group[-1]
    assert guide.step_ids == draft.encode(STEPS[1] + "\n") and guide.meta["agree"]
    assert guide.teacher is not None and guide.teacher.shape == (len(guide.step_ids), VOCAB)  # the dense term
    assert all(s.context_ids == draft.encode(STEPS[0] + "\n") for s in group)
    anchor = trajectory_sample(draft, prompt)
    assert anchor.step_ids == [*draft.encode("\n".join(STEPS)), END]

    def guide_logprob() -> float:
        with torch.no_grad():
            return float(step_logprobs(draft.module, [guide], draft.pad_id)[0].sum())

    before = guide_logprob()
    ref = copy.deepcopy(draft.module).eval()
    opt = torch.optim.AdamW(draft.module.parameters(), lr=3e-2)
    for _ in range(3):
        stats = sapo_update(
            draft.module,
            ref,
            opt,
            group,
            pad_id=draft.pad_id,
            clip_eps=0.2,
            kl_beta=0.02,
            distill=0.1,
            anchors=[anchor],
            anchor=1.0,
        )
        assert stats["anchor_nll"] > 0 and stats["distill"] > 0
    assert guide_logprob() > before, "the group's best step (the target's own) must become more likely"


def test_greedy_checks_and_validation_run_on_the_protocol() -> None:
    torch.manual_seed(1)
    draft: DraftPolicy = ByteDraft()
    target = ByteDraft().backend
    prompt = _prompt()
    matches = greedy_matches(draft, prompt.image, prompt.question, prompt.steps)
    for k, step in enumerate(prompt.steps):  # one teacher-forced forward says what the decode loop writes
        s = draft.backend.open_session(prompt.image, prompt.question)
        for before in prompt.steps[:k]:
            draft.backend.append(s, before, stop="\n")
        out = draft.backend.generate_step(s, max_tokens=96, stop="\n")
        assert matches[k] == (out.text == step and out.eos == (k == len(prompt.steps) - 1))
    figures = acceptance_at_prefixes(target, draft, [prompt], LikelihoodVerifier(1e-3, aggregate="mean"))
    assert figures["judged"] == len(prompt.steps) and 0.0 <= figures["acceptance"] <= 1.0
    assert figures["target_step_tokens"] == pytest.approx(sum(len(s.encode()) for s in prompt.steps) / len(STEPS))
