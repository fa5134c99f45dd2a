"""SAPO rollouts: at a prefix of the target's trajectory, sample a group of draft steps and let
the target score each in one forward.

A ``RolloutPrompt`` is (image, question, the target's trajectory). Where prompts come from is
the caller's (``prompts``): a task's puzzles with the target's trajectories, or the trajectory
store's verification log, where the target's step is the logged one.

The step delimiter and the answer prefix are the task's, from ``GenerationConfig``: a step is
appended as ``tok(step) + tok(delimiter)``, and the step starting with the answer prefix ends a
trajectory (its last token the end of the answer).

SAPO asks the target for evidence through ``StepScorer`` and the draft for samples and tokens
through ``draft.DraftPolicy``: any backend that offers these two small interfaces can stand on
either side.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import GenerationConfig
from dreamr_stream.sapo.config import DEFAULT_GENERATION
from dreamr_stream.sapo.draft import DraftPolicy, Encoder, SampledStep, StepSampling
from dreamr_stream.sapo.policy import PolicySample, batch_inputs
from dreamr_stream.sapo.rewards import RewardWeights, group_advantages, step_reward
from dreamr_stream.verify import Verifier

__all__ = [
    "RolloutPrompt",
    "StepScore",
    "StepScorer",
    "TransformersScorer",
    "rollout_group",
    "score_steps",
    "trajectory_sample",
]

log = logging.getLogger(__name__)


@dataclass
class RolloutPrompt:
    image: Image.Image
    question: str
    steps: list[str]  # the target's trajectory (or, from a log, the prefix + the target's step)
    key: str = ""
    start: int = 0  # first index worth sampling at (log prompts: the logged index)


def _appended(draft: DraftPolicy, step: str, *, last: bool, delimiter: str) -> list[int]:
    """One step as the backend appends it: ``tok(step) + tok(delimiter)``, or the end-of-answer
    token after a trajectory's last step."""
    return draft.encode(step) + ([draft.end_id] if last else draft.encode(delimiter))


def _context(model: Encoder, steps: list[str], delimiter: str) -> list[int]:
    """The verified steps as the backend appends them (each ``tok(step) + tok(delimiter)``), in
    the tokens of ``model``: the draft's, or the target's."""
    return [t for step in steps for t in model.encode(step) + model.encode(delimiter)]


def _batched(backend: TransformersBackend, inputs: dict[str, Any], rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Inputs for ``rows``, each continuing the same prompt (its image repeated per row)."""
    return batch_inputs([inputs] * len(rows), rows, backend.tokenizer.pad_token_id or 0, backend.device)


@dataclass
class StepScore:
    """The target's evidence on one candidate step (what ``backend.score`` gives), plus its
    next-token log-probs at each of the step's positions and at the delimiter's, (n + 1, V):
    the teacher of SAPO's dense term."""

    p_pos: float
    p_neg: float
    token_logprobs: list[float]
    next_logprobs: torch.Tensor | None = None


@torch.no_grad()
def score_steps(
    target: TransformersBackend,
    inputs: dict[str, Any],
    context: list[int],
    texts: list[str],
    judge: bool,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> list[StepScore]:
    """The evidence on each candidate step, all in ONE batched forward: the same evidence
    ``backend.score`` gives (candidate + delimiter [+ judge suffix])."""
    stop = target.encode(gen.step_delimiter)
    suffix = target.encode(target.judge.suffix) if judge else []
    base = inputs["input_ids"][0].tolist() + context
    special = set(target.tokenizer.all_special_ids)
    cands = [target.encode(t) for t in texts]
    # a step whose text encodes to special tokens (e.g. an image token) is not scored: no evidence
    valid = [i for i, c in enumerate(cands) if not special.intersection(c)]
    out = [StepScore(0.0, 0.0, [-math.inf]) for _ in cands]
    if not valid:
        return out
    rows = [base + cands[i] + stop + suffix for i in valid]
    logits = target.model(**_batched(target, inputs, rows)).logits.float()
    pos_id, neg_id = target.verdict_ids(target.judge) if judge else (0, 0)
    for b, i in enumerate(valid):
        c = cands[i]
        # logits at t predict token t+1; one more row: the position that predicts the delimiter
        lp = torch.log_softmax(logits[b, len(base) - 1 : len(base) + len(c)], dim=-1)
        token_lp = lp[: len(c)].gather(1, torch.tensor(c, device=lp.device)[:, None])[:, 0].tolist() if c else []
        p_pos = p_neg = 0.0
        if judge:
            probs = torch.softmax(logits[b, len(rows[b]) - 1], dim=-1)
            p_pos, p_neg = float(probs[pos_id]), float(probs[neg_id])
        out[i] = StepScore(p_pos, p_neg, token_lp, lp.cpu())
    return out


class StepScorer(Protocol):
    """What SAPO asks of the target, which any backend that gives log-probs of a step can offer
    (the draft is the policy SAPO trains, so it computes in this process)."""

    def encode(self, text: str) -> list[int]:
        """The target's tokens of ``text``: where they are the draft's, its per-token evidence
        lines up with the draft's step (the dense term and the credit use it there)."""
        ...

    def score_steps(
        self, image: Image.Image, question: str, prefix: list[str], texts: list[str], *, judge: bool
    ) -> list[StepScore]:
        """The evidence on each candidate step after the verified ``prefix``, as ``score_steps``
        gives it (``next_logprobs`` may be None: no dense term)."""
        ...


class TransformersScorer:
    """``StepScorer`` of a target computing in this process: every candidate in one batched
    forward (``score_steps``)."""

    def __init__(self, backend: TransformersBackend, gen: GenerationConfig = DEFAULT_GENERATION) -> None:
        self.backend, self.gen = backend, gen

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text)

    def score_steps(
        self, image: Image.Image, question: str, prefix: list[str], texts: list[str], *, judge: bool
    ) -> list[StepScore]:
        inputs = self.backend.prompt_inputs(image, question)
        context = _context(self.backend, prefix, self.gen.step_delimiter)
        return score_steps(self.backend, inputs, context, texts, judge, gen=self.gen)


def _aligned(draft: DraftPolicy, target: StepScorer, text: str, step_ids: list[int], token_lp: list[float]) -> bool:
    """Whether the target's per-token evidence lines up with the draft's step tokens: only where
    the draft's step holds exactly the target's tokens for it (same vocabulary, same split)."""
    ids = target.encode(text)
    return len(token_lp) == len(ids) and step_ids[: len(ids)] == ids and draft.encode(text) == ids


def _teacher(
    draft: DraftPolicy, target: StepScorer, text: str, step_ids: list[int], score: StepScore
) -> torch.Tensor | None:
    """The target's next-token log-probs at the draft step's positions, or None where they do
    not line up (other vocabulary or tokenisation, or a step cut at ``max_tokens``)."""
    q = score.next_logprobs
    if q is None or q.shape[-1] != draft.vocab_size or q.shape[0] != len(step_ids):
        return None
    return q if _aligned(draft, target, text, step_ids, score.token_logprobs) else None


def _credit(
    draft: DraftPolicy,
    target: StepScorer,
    text: str,
    step_ids: list[int],
    token_lp: list[float],
    verifier: Verifier | None,
) -> int | None:
    """Leading step tokens that take the advantage: up to and including the first token whose
    target probability is below the likelihood threshold ``tau / (1 + tau)``; None (all) when
    there is no such token, in judge mode, or when the two tokenisations do not line up."""
    if verifier is None or verifier.needs_judge or getattr(verifier, "aggregate", "min") != "min":
        return None
    if not math.isfinite(verifier.tau):
        return None
    if not _aligned(draft, target, text, step_ids, token_lp):
        return None
    floor = math.log(verifier.tau / (1.0 + verifier.tau)) if verifier.tau > 0 else -math.inf
    for t, lp in enumerate(token_lp):
        if lp < floor:
            return t + 1
    return None


def trajectory_sample(
    draft: DraftPolicy, prompt: RolloutPrompt, *, gen: GenerationConfig = DEFAULT_GENERATION
) -> PolicySample:
    """The target's whole trajectory as one off-policy sample for the draft, tokenised as the
    backend appends it (each step, then its delimiter; the last ends the answer): the row of
    SAPO's anchor term, which scores every step of it in one teacher-forced forward."""
    *body, last = prompt.steps
    delimiter = gen.step_delimiter
    ids = _context(draft, body, delimiter) + _appended(draft, last, last=True, delimiter=delimiter)
    return PolicySample(
        prompt=draft.prompt_inputs(prompt.image, prompt.question),
        context_ids=[],
        step_ids=ids,
        off_policy=True,
        meta={"key": prompt.key, "anchor": True},
    )


def _guide_member(draft: DraftPolicy, prompt: RolloutPrompt, k: int, delimiter: str) -> SampledStep:
    """The target's own step at prefix k, tokenised as the backend appends it (the trajectory's
    last step ends the answer)."""
    step, last = prompt.steps[k], k == len(prompt.steps) - 1
    return _appended(draft, step, last=last, delimiter=delimiter), step, last


def _evidence(score: StepScore, verifier: Verifier | None) -> tuple[float, float]:
    """(p_pos, p_neg) as the deployed TBVM mode looks at them; the judge's without a verifier."""
    if verifier is None:
        return score.p_pos, score.p_neg
    v = verifier.verify(score.p_pos, score.p_neg, score.token_logprobs)
    return v.p_pos, v.p_neg


def _scored_sample(
    draft: DraftPolicy,
    target: StepScorer,
    member: SampledStep,
    score: StepScore,
    *,
    inputs: dict[str, Any],
    context: list[int],
    target_step: str,
    weights: RewardWeights,
    verifier: Verifier | None,
    teach: bool,
    guide: bool,
) -> PolicySample:
    """One member of a group with its reward (its advantage comes with the whole group)."""
    step_ids, text, _ = member
    p_pos, p_neg = _evidence(score, verifier)
    reward = step_reward(
        p_pos=p_pos,
        p_neg=p_neg,
        text=text,
        n_tokens=len(step_ids),
        target_step=target_step,
        target_tokens=len(target.encode(target_step)) + 1,
        weights=weights,
    )
    return PolicySample(
        prompt=inputs,
        context_ids=list(context),
        step_ids=step_ids,
        credit=_credit(draft, target, text, step_ids, score.token_logprobs, verifier),
        teacher=_teacher(draft, target, text, step_ids, score) if teach else None,
        off_policy=guide,
        meta={
            "text": text,
            "reward": reward,
            "p_pos": p_pos,
            "p_neg": p_neg,
            "agree": text.strip() == target_step.strip(),
            "tokens": len(step_ids),
            "guide": guide,
        },
    )


@torch.no_grad()
def rollout_group(
    target: StepScorer,
    draft: DraftPolicy,
    prompt: RolloutPrompt,
    k: int,
    *,
    group_size: int,
    temperature: float,
    weights: RewardWeights,
    rng: random.Random,
    max_step_tokens: int = 64,
    verifier: Verifier | None = None,
    guide: bool = False,
    teach: bool = False,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> list[PolicySample]:
    """G sampled draft steps at prefix k, each with its reward, group advantage and verdict.

    Sampling is one ``sample_steps`` call on the draft (with ``TransformersDraft``, one batched
    ``generate``) and scoring one ``score_steps`` call on the target (with ``TransformersScorer``,
    one batched forward: a group costs about what one sample did step by step); both follow the
    backend's tokenisation and step rules, which tests check against the backend's decode loop
    and ``backend.score``.

    With ``guide``, the target's own step joins the group as one more member (an off-policy
    rollout, scored like the others): when every sample misreads the same cell, the group still
    holds one faithful step to move towards. This is the guided-group variant of GRPO (off-policy
    guidance, as in LUFFY); the clipped ratio and the KL term apply to it unchanged.
    """
    delimiter = gen.step_delimiter
    d_inputs = draft.prompt_inputs(prompt.image, prompt.question)
    d_context = _context(draft, prompt.steps[:k], delimiter)
    how = StepSampling(temperature, max_step_tokens, gen)
    members = draft.sample_steps(d_inputs, d_context, group_size, how, seed=rng.randrange(2**31))
    if guide:
        members.append(_guide_member(draft, prompt, k, delimiter))
    needs_judge = verifier is None or verifier.needs_judge
    texts = [text for _, text, _ in members]
    scores = target.score_steps(prompt.image, prompt.question, prompt.steps[:k], texts, judge=needs_judge)
    samples = [
        _scored_sample(
            draft,
            target,
            member,
            score,
            inputs=d_inputs,
            context=d_context,
            target_step=prompt.steps[k],
            weights=weights,
            verifier=verifier,
            teach=teach,
            guide=guide and i == len(members) - 1,
        )
        for i, (member, score) in enumerate(zip(members, scores, strict=True))
    ]
    for s, a in zip(samples, group_advantages([s.meta["reward"] for s in samples]), strict=True):
        s.advantage = a
    return samples
