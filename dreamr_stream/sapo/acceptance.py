"""How often TBVM accepts the draft's greedy step at the prefixes of the target's trajectories:
SAPO's validation, and ``dreamr zoo eval --prefixes``.

The steps are decoded and scored through the engine's backend calls (``ModelBackend``), the
draft's greedy step as FPSR would draft it; step lengths count the draft's tokens (``Encoder``).
Three stages, each usable alone: ``scored_greedy_steps`` (the expensive one: a decode and a
score per prefix), ``verdicts_of`` (a verifier's verdicts on them) and ``acceptance_of`` (the
figures); ``acceptance_at_prefixes`` runs all three for SAPO's draft."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dreamr_stream.backends.base import ModelBackend, ScoreOutput
from dreamr_stream.config import GenerationConfig
from dreamr_stream.sapo.config import DEFAULT_GENERATION
from dreamr_stream.sapo.draft import DraftPolicy, Encoder
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.verify import Verifier

__all__ = [
    "PrefixVerdict",
    "ScoredStep",
    "acceptance_at_prefixes",
    "acceptance_of",
    "scored_greedy_steps",
    "verdicts_of",
]


@dataclass(frozen=True)
class PrefixVerdict:
    """The draft's greedy step at one prefix of a target trajectory, as TBVM judged it."""

    prompt: int  # index into the prompts judged
    k: int  # steps of the target's trajectory before it
    accepted: bool
    tokens: int


@dataclass(frozen=True)
class ScoredStep:
    """The draft's greedy step at one prefix of a target trajectory and the target's score of it."""

    prompt: int  # index into the prompts
    k: int  # steps of the target's trajectory before it
    text: str
    score: ScoreOutput

    def is_targets(self, prompts: Sequence[RolloutPrompt]) -> bool:
        """Whether it is the target's own step there (what the target would have written)."""
        return self.text == prompts[self.prompt].steps[self.k]


@torch.no_grad()
def scored_greedy_steps(
    target: ModelBackend[Any],
    draft: ModelBackend[Any],
    prompts: Sequence[RolloutPrompt],
    *,
    judge: bool,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> Iterator[ScoredStep]:
    """The draft's greedy step at every prefix of the target's trajectories (the prefix FPSR
    verifies against) and the target's score of it (with the judge suffix when ``judge``), through
    the engine's own backend calls."""
    stop = gen.step_delimiter
    for i, p in enumerate(prompts):
        for k in range(p.start, len(p.steps)):
            ds = draft.open_session(p.image, p.question)
            ts = target.open_session(p.image, p.question)
            try:
                for step in p.steps[:k]:
                    draft.append(ds, step, stop=stop)
                    target.append(ts, step, stop=stop)
                text = draft.generate_step(ds, max_tokens=64, stop=stop).text
                score = target.score(ts, text, stop=stop, judge=target.judge if judge else None)
            finally:
                draft.close(ds)
                target.close(ts)
            yield ScoredStep(i, k, text, score)


def verdicts_of(steps: Iterable[ScoredStep], draft: Encoder, verifier: Verifier) -> list[PrefixVerdict]:
    """``verifier``'s verdicts on steps the target scored (with the judge suffix, if it needs it)."""
    return [
        PrefixVerdict(
            s.prompt,
            s.k,
            verifier.verify(s.score.p_pos, s.score.p_neg, s.score.token_logprobs).accepted,
            len(draft.encode(s.text)),
        )
        for s in steps
    ]


def acceptance_at_prefixes(
    target: ModelBackend[Any],
    draft: DraftPolicy,
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
    steps = scored_greedy_steps(target, draft.backend, prompts, judge=verifier.needs_judge, gen=gen)
    return acceptance_of(verdicts_of(steps, draft, verifier), prompts, draft)


def acceptance_of(vs: Sequence[PrefixVerdict], prompts: Sequence[RolloutPrompt], draft: Encoder) -> dict[str, float]:
    """``acceptance_at_prefixes``'s figures from verdicts already made (``verdicts_of``)."""
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
