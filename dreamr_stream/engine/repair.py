"""The target's step after a rejected draft: repaired when it can be, rewritten otherwise.

A rejected candidate was scored on the target's session in one forward, which also showed
where the candidate stops being the target's greedy choice (``ScoreOutput.agreed``). A repair
rolls the candidate back, begins the target's step with that agreed start and continues it
with the candidate's rest as a proposal: the backend checks the proposal several tokens per
forward and keeps only its own greedy tokens (speculative decoding with the rejected step as
the guess). The result is exactly the step the target would have written, at a fraction of
its forwards: a rejected step usually differs from the target's in a token or two (a count,
a mark) and agrees again after them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamr_stream.backends.base import ScoreOutput, Session
from dreamr_stream.engine import calls
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.types import StepCost

__all__ = ["TargetStep", "can_repair", "write_target_step"]


@dataclass(frozen=True)
class TargetStep:
    text: str
    eos: bool
    kept: str | None  # the rejected draft's start the step kept (None: written whole)
    cost: StepCost


def can_repair(ctx: RequestContext, runner: ModelRunner, score: ScoreOutput | None) -> bool:
    """Whether a rejected step scored as ``score`` is repaired rather than rewritten."""
    return score is not None and score.agreed is not None and runner.can_repair and ctx.config.scheduling.repair


async def write_target_step(
    ctx: RequestContext,
    runner: ModelRunner,
    session: Session,
    *,
    index: int,
    rejected: str = "",
    score: ScoreOutput | None = None,
) -> TargetStep:
    """The target's own step ``index`` on ``session``. ``score`` is the rejected candidate's
    scoring (its tokens are still in ``session``): they are rolled back, and the step is
    repaired from them when the backend and the configuration allow, else written whole."""
    if score is not None and score.n_tokens:
        await runner.rollback(session, score.n_tokens)
    kept_tokens = 0
    agreed = score.agreed if score is not None and can_repair(ctx, runner, score) else None
    if agreed is not None:
        rest = rejected[len(agreed) :] if rejected.startswith(agreed) else ""
        proposal = rest + ctx.config.generation.step_delimiter if rest else ""
        kept_tokens = await runner.begin_step(session, agreed, proposal=proposal)
        ctx.count(runner, 1 if kept_tokens else 0)
    out = await calls.write_step(ctx, runner, session, index=index, lane="target")
    cost = calls.step_cost(out, kept_tokens=kept_tokens, extra_forwards=1 if kept_tokens else 0)
    return TargetStep(out.text, out.eos, agreed or None, cost)
