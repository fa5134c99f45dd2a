"""SAPO rollouts: at a prefix of the target's trajectory, sample a group of draft steps and let
the target score each in one forward.

A ``RolloutPrompt`` is (image, question, the target's trajectory). Prompts come from the task's
train split (the target writes its trajectory once; cached on disk) or from the trajectory
store's verification log (``prompts_from_log``), where the target's step is the logged one.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from dreamr_stream.backends.hf import HFSession, TransformersBackend
from dreamr_stream.sapo.policy import PolicySample
from dreamr_stream.sapo.rewards import RewardWeights, group_advantages, step_reward
from dreamr_stream.store import LogEntry
from dreamr_stream.verify import Verifier

__all__ = ["RolloutPrompt", "TrajectoryCache", "prompts_from_log", "rollout_group", "target_trajectory"]

log = logging.getLogger(__name__)
STOP = "\n"


@dataclass
class RolloutPrompt:
    image: Image.Image
    question: str
    steps: list[str]  # the target's trajectory (or, from a log, the prefix + the target's step)
    key: str = ""
    start: int = 0  # first index worth sampling at (log prompts: the logged index)


def target_trajectory(target: TransformersBackend, image: Image.Image, question: str, max_steps: int = 16) -> list[str]:
    """The target's own greedy steps (the reference SAPO aligns the draft to)."""
    s = target.open_session(image, question)
    steps: list[str] = []
    try:
        while len(steps) < max_steps:
            out = target.generate_step(s, max_tokens=96, stop=STOP)
            steps.append(out.text)
            if out.eos or out.text.startswith("Answer:"):
                break
    finally:
        target.close(s)
    return steps


class TrajectoryCache:
    """Target trajectories per prompt key, persisted as JSON lines (resumable, computed once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, list[str]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                self.items[rec["key"]] = rec["steps"]

    def get(self, key: str, compute: Callable[[], list[str]]) -> list[str]:
        if key not in self.items:
            self.items[key] = compute()
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "steps": self.items[key]}) + "\n")
        return self.items[key]


def prompts_from_log(entries: Iterable[LogEntry], images: dict[str, bytes]) -> list[RolloutPrompt]:
    """Rollout prompts from logged verifications: the prefix, then the target's step (the step
    the target wrote after a rejection, or the accepted draft)."""
    prompts = []
    for e in entries:
        target_step = e.target_step or (e.draft if e.verdict is not None and e.verdict.accepted else None)
        png = images.get(e.image)
        if target_step is None or png is None:
            continue
        image = Image.open(io.BytesIO(png)).convert("RGB")
        prompts.append(RolloutPrompt(image, e.question, [*e.prefix, target_step], key=e.key, start=e.index))
    return prompts


def _open_with_prefix(backend: TransformersBackend, prompt: RolloutPrompt, k: int, seed: int) -> HFSession:
    s = backend.open_session(prompt.image, prompt.question, seed=seed)
    for step in prompt.steps[:k]:
        backend.append(s, step, stop=STOP)
    return s


@torch.no_grad()
def rollout_group(
    target: TransformersBackend,
    draft: TransformersBackend,
    prompt: RolloutPrompt,
    k: int,
    *,
    group_size: int,
    temperature: float,
    weights: RewardWeights,
    rng: random.Random,
    max_step_tokens: int = 64,
    verifier: Verifier | None = None,
) -> list[PolicySample]:
    """G sampled draft steps at prefix k, each with its reward, group advantage and verdict."""
    ds = _open_with_prefix(draft, prompt, k, seed=rng.randrange(2**31))
    ts = _open_with_prefix(target, prompt, k, seed=0)
    context = ds.ids[ds.prompt_len :]
    target_step = prompt.steps[k]
    target_tokens = len(target.encode(target_step))
    samples: list[PolicySample] = []
    rewards: list[float] = []
    try:
        for _ in range(group_size):
            fork = draft.fork(ds)
            fork.generator = torch.Generator().manual_seed(rng.randrange(2**31))
            out = draft.generate_step(fork, max_tokens=max_step_tokens, stop=STOP, temperature=temperature)
            step_ids = fork.ids[len(ds.ids) :]
            if out.eos:  # the step ended the answer: train the end-of-sequence token too
                step_ids = [*step_ids, next(iter(draft.eos_ids))]
            draft.close(fork)
            tfork = target.fork(ts)
            needs_judge = verifier is None or verifier.needs_judge
            score = target.score(tfork, out.text, stop=STOP, judge=target.judge if needs_judge else None)
            target.close(tfork)
            if verifier is not None:  # the evidence the deployed TBVM mode looks at
                v = verifier.verify(score.p_pos, score.p_neg, score.token_logprobs)
                score = replace(score, p_pos=v.p_pos, p_neg=v.p_neg)
            reward = step_reward(
                p_pos=score.p_pos,
                p_neg=score.p_neg,
                text=out.text,
                n_tokens=len(step_ids),
                target_step=target_step,
                target_tokens=target_tokens + 1,
                weights=weights,
            )
            rewards.append(reward)
            samples.append(
                PolicySample(
                    prompt=ds.inputs,
                    context_ids=list(context),
                    step_ids=step_ids,
                    meta={
                        "text": out.text,
                        "reward": reward,
                        "p_pos": score.p_pos,
                        "p_neg": score.p_neg,
                        "agree": out.text.strip() == target_step.strip(),
                        "tokens": len(step_ids),
                    },
                )
            )
    finally:
        draft.close(ds)
        target.close(ts)
    for s, a in zip(samples, group_advantages(rewards), strict=True):
        s.advantage = a
    return samples
