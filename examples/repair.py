"""Repaired steps: where the target departs from a rejected draft, and what the repair cost.

python examples/repair.py

A strict threshold (tau=20) rejects more drafts than the shipped setting, so that several steps
are repaired: the target keeps the start of the rejected draft that is its own greedy choice,
checks the draft's rest several tokens per forward and writes only what differs. Each line
shows the kept part, then [the target's tail], then the forwards it took against one per token.
"""

from __future__ import annotations

from dreamr_stream import Reasoner
from dreamr_stream.config import ReasonerConfig, VerificationConfig
from dreamr_stream.tasks import get_task


def main() -> None:
    reasoner = Reasoner.demo()
    config = ReasonerConfig(verification=reasoner.config.verification.model_copy(update={"tau": 20.0}))
    assert isinstance(config.verification, VerificationConfig)
    puzzle = get_task("grid").item("test", 3)
    result = reasoner.invoke(puzzle.image, puzzle.question, config=config)
    for step in result.steps:
        if step.rejected_draft is None:
            print(f"{step.index:2d} {step.source.value:6s} {step.text}")
            continue
        kept = step.kept or ""
        cost = step.cost
        spent = f"{cost.target_forwards} forwards for {cost.tokens} tokens" if cost else ""
        print(f"{step.index:2d} repair  {kept}[{step.text[len(kept) :]}]  ({spent})")
        print(f"   draft   {step.rejected_draft}")
    print(f"answer {result.answer} (truth {puzzle.answer}); {result.stats.steps_repaired} steps repaired")


if __name__ == "__main__":
    main()
