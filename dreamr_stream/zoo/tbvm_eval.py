"""TBVM against ground truth, both modes from one scoring pass.

Two sets of labelled candidate steps:

* the judge set: after a correct prefix, the reference step (right) or a corruption of it
  (``Task.judge_item``; the grid task's: misread cell, wrong mark, wrong totals, wrong arithmetic,
  wrong answer);
* the drafts' real steps: at every prefix of the target's own greedy trajectory, a draft's greedy
  step, right iff it is the target's own step there ("the target would have written this"): what
  TBVM decides in FPSR.

The target scores each candidate once with its judge suffix; the score holds both the verdict
probabilities (judge mode) and the candidate's token log-probs (likelihood mode), so both modes
judge the very same items. ``choose_tau`` picks a mode's tau on one split (report on another).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from dreamr_stream.backends.base import ScoreOutput
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import VerificationConfig
from dreamr_stream.sapo.acceptance import ScoredStep, scored_greedy_steps
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.tasks import DEFAULT_TASK, Split, TaskLike, as_task, get_task
from dreamr_stream.verify import make_verifier
from dreamr_stream.zoo.data import STEP_DELIMITER

__all__ = [
    "MODES",
    "Labelled",
    "TbvmReport",
    "auroc",
    "choose_tau",
    "draft_steps_scored",
    "judge_set_scored",
    "labelled_steps",
    "tbvm_report",
]

MODES = ("judge", "likelihood")
# the taus choose_tau tries: a log grid over ratios p_pos / p_neg from 1/1000 to 1000
TAU_GRID = tuple(10 ** (e / 8) for e in range(-24, 25))


@dataclass(frozen=True)
class Labelled:
    """A candidate step, what is wrong with it (``"none"``: nothing) and the target's score of it."""

    kind: str
    score: ScoreOutput

    @property
    def right(self) -> bool:
        return self.kind == "none"


@dataclass(frozen=True)
class TbvmReport:
    """TBVM in one mode at one tau on labelled steps; "positive" is a right step."""

    mode: str
    tau: float
    n: int
    right: int  # steps that are right
    recall: float  # share of right steps accepted
    false_accept: float  # share of wrong steps accepted
    precision: float  # share of accepted steps that are right
    agreement: float  # share of verdicts that match the label
    accept_by_kind: dict[str, float]  # acceptance per kind of step


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """How well ``scores`` separate ``positive`` items from the rest: the probability that a random
    positive scores above a random negative (ties count half; nan without both)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def judge_set_scored(
    target: TransformersBackend, split: Split = "test", n: int = 200, seed: int = 0, *, task: TaskLike = DEFAULT_TASK
) -> list[Labelled]:
    """The judge set's items (from items ``10_000 + i`` of ``split`` of ``task``), scored by the target."""
    chosen = as_task(task)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        item = chosen.judge_item(chosen.item(split, 10_000 + i), rng)
        session = target.open_session(item.item.image, item.item.question)
        try:
            for step in item.prefix:
                target.append(session, step, stop=STEP_DELIMITER)
            score = target.score(session, item.candidate, stop=STEP_DELIMITER, judge=target.judge)
        finally:
            target.close(session)
        out.append(Labelled(item.corruption, score))
    return out


def draft_steps_scored(
    target: TransformersBackend, draft: TransformersBackend, prompts: Sequence[RolloutPrompt]
) -> list[Labelled]:
    """A draft's greedy steps at every prefix of the target's trajectories, scored by the target;
    labelled right iff the step is the target's own there."""
    return labelled_steps(scored_greedy_steps(target, draft, prompts, judge=True), prompts)


def labelled_steps(steps: Iterable[ScoredStep], prompts: Sequence[RolloutPrompt]) -> list[Labelled]:
    """Scored draft steps labelled right iff each is the target's own step there."""
    return [Labelled("none" if s.is_targets(prompts) else "not the target's step", s.score) for s in steps]


def _verdicts(items: Iterable[Labelled], mode: str, tau: float) -> list[tuple[Labelled, bool]]:
    verifier = make_verifier(VerificationConfig(mode=mode, tau=tau))  # type: ignore[arg-type]
    return [(x, verifier.verify(x.score.p_pos, x.score.p_neg, x.score.token_logprobs).accepted) for x in items]


def tbvm_report(items: Sequence[Labelled], mode: str, tau: float) -> TbvmReport:
    judged = _verdicts(items, mode, tau)
    right = [a for x, a in judged if x.right]
    wrong = [a for x, a in judged if not x.right]
    accepted = [x.right for x, a in judged if a]
    kinds: dict[str, list[bool]] = {}
    for x, a in judged:
        kinds.setdefault(x.kind, []).append(a)
    return TbvmReport(
        mode=mode,
        tau=tau,
        n=len(items),
        right=len(right),
        recall=sum(right) / max(1, len(right)),
        false_accept=sum(wrong) / max(1, len(wrong)),
        precision=sum(accepted) / len(accepted) if accepted else math.nan,
        agreement=sum(x.right == a for x, a in judged) / max(1, len(judged)),
        accept_by_kind={k: sum(v) / len(v) for k, v in sorted(kinds.items())},
    )


def choose_tau(items: Sequence[Labelled], mode: str, grid: Sequence[float] = TAU_GRID) -> float:
    """The tau of ``grid`` with the most verdicts matching the labels (ties: the lowest tau, which
    accepts the most and so is the fastest)."""
    return max(grid, key=lambda tau: (tbvm_report(items, mode, tau).agreement, -tau))


def main(argv: list[str] | None = None) -> None:
    """``dreamr zoo tbvm``: choose each mode's tau on one split's judge set and drafts' steps."""
    import argparse
    import json
    import shlex
    import sys
    from dataclasses import asdict
    from datetime import date
    from pathlib import Path

    from dreamr_stream.sapo.prompts import TrajectoryCache
    from dreamr_stream.zoo.prompts import task_prompts

    parser = argparse.ArgumentParser(description="Choose TBVM's tau in each mode on labelled steps of one split.")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, action="append", default=[], help="a draft folder (repeatable)")
    parser.add_argument("--task", default=DEFAULT_TASK, help="the task whose items to judge")
    parser.add_argument("--split", default="val", help="choose on this split, report the test split elsewhere")
    parser.add_argument("--judge-n", type=int, default=300)
    parser.add_argument("--prefixes", type=int, default=50, help="puzzles whose every prefix a draft writes a step at")
    parser.add_argument("--json", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    task = get_task(args.task)
    target = TransformersBackend.from_pretrained(args.target, device="cpu", name="target")
    items = judge_set_scored(target, args.split, args.judge_n, task=task)
    prompts = task_prompts(target, TrajectoryCache(), args.split, args.prefixes, task=task)
    for folder in args.draft:
        draft = TransformersBackend.from_pretrained(folder, device="cpu", name=folder.name)
        items += draft_steps_scored(target, draft, prompts)
    report: dict[str, object] = {
        "command": shlex.join(["dreamr", "zoo", "tbvm", *argv]),
        "date": date.today().isoformat(),
        "task": task.name,
        "split": args.split,
        "items": len(items),
    }
    for mode in MODES:
        tau = choose_tau(items, mode)
        report[mode] = asdict(tbvm_report(items, mode, tau))
        print(json.dumps(report[mode]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
