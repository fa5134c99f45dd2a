"""How often TBVM accepts the draft's greedy step at the prefixes of the target's trajectories:
SAPO's validation, and ``dreamr zoo eval --prefixes``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dreamr_stream.backends.base import ModelBackend
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import GenerationConfig
from dreamr_stream.sapo.config import DEFAULT_GENERATION
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.verify import Verifier

__all__ = ["PrefixVerdict", "acceptance_at_prefixes", "greedy_verdicts"]


@dataclass(frozen=True)
class PrefixVerdict:
    """The draft's greedy step at one prefix of a target trajectory, as TBVM judged it."""

    prompt: int  # index into the prompts judged
    k: int  # steps of the target's trajectory before it
    accepted: bool
    tokens: int


@torch.no_grad()
def greedy_verdicts(
    target: ModelBackend[Any],
    draft: TransformersBackend,
    prompts: Sequence[RolloutPrompt],
    verifier: Verifier,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> list[PrefixVerdict]:
    """TBVM's verdict on the draft's greedy step at every prefix of the target's trajectories
    (the prefix FPSR verifies against), through the engine's own backend calls."""
    out, stop = [], gen.step_delimiter
    for i, p in enumerate(prompts):
        for k in range(p.start, len(p.steps)):
            ds = draft.open_session(p.image, p.question)
            ts = target.open_session(p.image, p.question)
            try:
                for step in p.steps[:k]:
                    draft.append(ds, step, stop=stop)
                    target.append(ts, step, stop=stop)
                step_out = draft.generate_step(ds, max_tokens=64, stop=stop)
                score = target.score(ts, step_out.text, stop=stop, judge=target.judge if verifier.needs_judge else None)
            finally:
                draft.close(ds)
                target.close(ts)
            verdict = verifier.verify(score.p_pos, score.p_neg, score.token_logprobs)
            out.append(PrefixVerdict(i, k, verdict.accepted, len(draft.encode(step_out.text))))
    return out


def acceptance_at_prefixes(
    target: ModelBackend[Any],
    draft: TransformersBackend,
    prompts: Sequence[RolloutPrompt],
    verifier: Verifier,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> dict[str, float]:
    """TBVM acceptance of the draft's greedy step at every prefix of the target's trajectories,
    and where the draft's step length comes from. Lengths are in tokens, means over all judged
    prefixes, so that::

        step_tokens = target_step_tokens + excess_tokens - shortfall_tokens

    ``excess_tokens`` is what the reward's conciseness term penalises (tokens beyond the
    target's step), ``shortfall_tokens`` what the draft leaves out of it; ``accepted_*`` are
    the same means over the accepted steps alone, against the target's steps there."""
    vs = greedy_verdicts(target, draft, prompts, verifier, gen=gen)
    n = max(1, len(vs))
    # the target's own step at the same prefixes, in the draft's tokens: the length to match
    targets = [len(draft.encode(prompts[v.prompt].steps[v.k])) for v in vs]
    pairs = list(zip(vs, targets, strict=True))
    accepted = [(v, t) for v, t in pairs if v.accepted]
    m = max(1, len(accepted))
    return {
        "acceptance": len(accepted) / n,
        "step_tokens": sum(v.tokens for v in vs) / n,
        "target_step_tokens": sum(targets) / n,
        "excess_tokens": sum(max(0, v.tokens - t) for v, t in pairs) / n,
        "shortfall_tokens": sum(max(0, t - v.tokens) for v, t in pairs) / n,
        "accepted_step_tokens": sum(v.tokens for v, _ in accepted) / m,
        "accepted_target_step_tokens": sum(t for _, t in accepted) / m,
        "judged": len(vs),
    }
