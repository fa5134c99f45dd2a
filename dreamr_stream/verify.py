"""TBVM: threshold-based verification of draft steps. Pure, synchronous, no torch.

Judge mode (the paper's contrastive probability normalisation): the target reads
``<prefix><candidate><delimiter><judge suffix>`` and we take the next-token probabilities of
the positive and negative verdict tokens::

    ratio = p_pos / p_neg            accept iff ratio >= tau
          <=> p_pos / (p_pos + p_neg) >= tau / (1 + tau)

Only the two verdict tokens matter: mass on other tokens cancels out of the ratio.

Likelihood mode (no judge prompt): from the target's own log-probabilities of the candidate's
tokens ``l_i = log p(c_i | prefix, c_<i)``::

    p_pos = exp(min_i l_i)           (aggregate="min": the least likely token decides)
    p_pos = exp(mean_i l_i)          (aggregate="mean": geometric-mean token probability)
    p_neg = 1 - p_pos,  ratio = p_pos / p_neg

so ``tau = 1`` accepts a step whose pooled token probability is at least 1/2.

Edge cases: missing evidence (both probabilities 0, NaN, or no tokens) gives ratio 0 and is
rejected for any tau > 0; ``tau = 0`` accepts everything; ``tau = inf`` rejects everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol

from dreamr_stream.config import VerificationConfig
from dreamr_stream.types import Verdict

__all__ = ["JudgeVerifier", "LikelihoodVerifier", "Verifier", "decide", "ratio_of"]


def ratio_of(p_pos: float, p_neg: float) -> float:
    """p_pos / p_neg with the edge cases of the module docstring."""
    if not (math.isfinite(p_pos) and math.isfinite(p_neg)) or p_pos <= 0.0:
        return 0.0
    return math.inf if p_neg <= 0.0 else p_pos / p_neg


def decide(p_pos: float, p_neg: float, tau: float, mode: str = "judge") -> Verdict:
    ratio = ratio_of(p_pos, p_neg)
    accepted = tau == 0.0 or (math.isfinite(tau) and ratio >= tau)
    clean = [x if math.isfinite(x) else 0.0 for x in (p_pos, p_neg)]
    return Verdict(p_pos=clean[0], p_neg=clean[1], ratio=ratio, tau=tau, accepted=accepted, mode=mode)


class Verifier(Protocol):
    """Evidence in, Verdict out. ``needs_judge`` says whether the judge suffix must be scored."""

    tau: float
    needs_judge: bool

    def verify(self, p_pos: float, p_neg: float, token_logprobs: Sequence[float]) -> Verdict: ...


class JudgeVerifier:
    needs_judge = True

    def __init__(self, tau: float) -> None:
        self.tau = tau

    def verify(self, p_pos: float, p_neg: float, token_logprobs: Sequence[float]) -> Verdict:
        return decide(p_pos, p_neg, self.tau, "judge")


class LikelihoodVerifier:
    needs_judge = False

    def __init__(self, tau: float, aggregate: Literal["min", "mean"] = "min") -> None:
        self.tau = tau
        self.aggregate = aggregate

    def verify(self, p_pos: float, p_neg: float, token_logprobs: Sequence[float]) -> Verdict:
        if not token_logprobs:
            return decide(0.0, 0.0, self.tau, "likelihood")
        pooled = min(token_logprobs) if self.aggregate == "min" else sum(token_logprobs) / len(token_logprobs)
        p = math.exp(pooled)
        return decide(p, 1.0 - p, self.tau, "likelihood")


def make_verifier(v: VerificationConfig) -> Verifier:
    """The TBVM verifier a verification config describes."""
    if v.mode == "likelihood":
        return LikelihoodVerifier(v.tau, v.likelihood_aggregate)
    return JudgeVerifier(v.tau)
