"""The target's greedy trajectory of a prompt, and one-forward checks of what a model writes
greedily (``greedy_matches``: per step; ``greedy_writes``: a whole trajectory), which let a
task's reference solution stand in for the target's trajectory where it is exactly that.

``greedy_matches`` asks only what SAPO asks of the draft it trains (``draft.DraftPolicy``): a
teacher-forced forward of its module; the target is checked through ``TransformersDraft``."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from dreamr_stream.backends.base import ModelBackend
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import GenerationConfig
from dreamr_stream.sapo.config import DEFAULT_GENERATION
from dreamr_stream.sapo.draft import DraftPolicy, TransformersDraft
from dreamr_stream.sapo.policy import batch_inputs

__all__ = ["TRAJECTORY_STEP_TOKENS", "greedy_matches", "greedy_writes", "target_trajectory"]

TRAJECTORY_STEP_TOKENS = 96  # the decode cap per step of the target's reference trajectory


def target_trajectory(
    target: ModelBackend[Any],
    image: Image.Image,
    question: str,
    max_steps: int = 16,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> list[str]:
    """The target's own greedy steps (the reference SAPO aligns the draft to)."""
    s = target.open_session(image, question)
    steps: list[str] = []
    try:
        while len(steps) < max_steps:
            out = target.generate_step(s, max_tokens=TRAJECTORY_STEP_TOKENS, stop=gen.step_delimiter)
            steps.append(out.text)
            if gen.is_final(out.text, out.eos):
                break
    finally:
        target.close(s)
    return steps


@torch.no_grad()
def greedy_matches(
    model: DraftPolicy,
    image: Image.Image,
    question: str,
    steps: list[str],
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> list[bool]:
    """For each k, whether the model's greedy step after ``steps[:k]`` is exactly ``steps[k]``,
    all from ONE teacher-forced forward: every token of the step, then its delimiter (the end
    of the answer after the last step), is the argmax where it stands."""
    if not steps:
        return []
    inputs = model.prompt_inputs(image, question)
    base = inputs["input_ids"][0].tolist()
    stop = model.encode(gen.step_delimiter)
    ends = [stop] * (len(steps) - 1) + [[]]
    step_ids = [model.encode(st) for st in steps]
    row = base + [t for ids, end in zip(step_ids, ends, strict=True) for t in ids + end]
    device = next(model.module.parameters()).device
    logits = model.module(**batch_inputs([inputs], [row], model.pad_id, device)).logits[0]
    picks = logits[len(base) - 1 :].argmax(-1).tolist()  # the greedy token after each position
    out, at = [], 0
    for ids, end in zip(step_ids, ends, strict=True):
        want = ids + end
        got = picks[at : at + len(want) + (0 if end else 1)]
        ok = got[: len(want)] == want and (bool(end) or (len(got) > len(want) and got[-1] in model.end_ids))
        out.append(bool(ids) and ok)
        at += len(want)
    return out


def greedy_writes(
    target: TransformersBackend,
    image: Image.Image,
    question: str,
    steps: list[str],
    max_steps: int = 16,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> bool:
    """Whether ``target_trajectory`` would return exactly ``steps`` (``greedy_matches`` at every
    step, only the last one final, ending the answer). A task's reference solution then stands in
    for the target's trajectory at about 1% of the cost of decoding it token by token."""
    if not steps or len(steps) > max_steps or not gen.is_final(steps[-1]):
        return False
    if any(gen.is_final(st) or gen.step_delimiter in st for st in steps[:-1]):
        return False
    # the step text must survive the round trip, and no step may reach the decode cap
    for st in steps:
        ids = target.encode(st)
        if len(ids) >= TRAJECTORY_STEP_TOKENS or target.decode(ids) != st:
            return False
    return all(greedy_matches(TransformersDraft(target), image, question, steps, gen=gen))
