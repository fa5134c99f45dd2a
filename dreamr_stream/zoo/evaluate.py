"""Measure the demo models on held-out puzzles, through the real engine paths.

* final-answer accuracy of a method (target-only, draft-only, FPSR, ...) on a split;
* TBVM step acceptance of a draft (FPSR stats: accepted / judged);
* the judge set: the share of correct steps TBVM accepts and of corrupted steps it accepts.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import anyio

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.reasoner import Method, Reasoner
from dreamr_stream.sapo.acceptance import acceptance_at_prefixes
from dreamr_stream.sapo.prompts import TrajectoryCache
from dreamr_stream.verify import make_verifier
from dreamr_stream.zoo.prompts import task_prompts
from dreamr_stream.zoo.task import Split, make_judge_item, make_puzzle, parse_answer, split_seed

__all__ = ["JudgeReport", "MethodReport", "evaluate_judge", "evaluate_method"]


@dataclass
class MethodReport:
    method: str
    n: int
    accuracy: float
    acceptance: float | None
    mean_steps: float
    mean_wall_s: float
    mean_draft_step_words: float | None = None
    wrong: list[int] = field(default_factory=list)


@dataclass
class JudgeReport:
    n: int
    tau: float
    accept_correct: float
    accept_corrupted: float
    by_corruption: dict[str, float]


async def _method(reasoner: Reasoner, method: Method, split: Split, n: int, start: int = 0) -> MethodReport:
    correct = judged = accepted = steps = 0
    wall = 0.0
    draft_words = draft_steps = 0
    wrong = []
    for i in range(start, start + n):
        puzzle = make_puzzle(split_seed(split, i), hard=split == "hard")
        result = await reasoner.ainvoke(puzzle.image, puzzle.question.text(), method=method)
        got = parse_answer(result.steps[-1].text) if result.steps else None
        if got == puzzle.answer:
            correct += 1
        else:
            wrong.append(i)
        judged += result.stats.draft_steps_judged
        accepted += result.stats.draft_steps_accepted
        steps += len(result.steps)
        wall += result.stats.wall_s
        for s in result.steps:
            if s.source.value == "draft":
                draft_steps += 1
                draft_words += len(s.text.split())
    return MethodReport(
        method=method,
        n=n,
        accuracy=correct / n,
        acceptance=accepted / judged if judged else None,
        mean_steps=steps / n,
        mean_wall_s=wall / n,
        mean_draft_step_words=draft_words / draft_steps if draft_steps else None,
        wrong=wrong,
    )


def evaluate_method(reasoner: Reasoner, method: Method, split: Split = "test", n: int = 100) -> MethodReport:
    return anyio.run(_method, reasoner, method, split, n)


def evaluate_judge(
    target: TransformersBackend, tau: float, split: Split = "test", n: int = 200, seed: int = 0, mode: str = "judge"
) -> JudgeReport:
    """TBVM on correct and corrupted candidate steps after a correct prefix (direct backend calls)."""
    rng = random.Random(seed)
    verifier = make_verifier(VerificationConfig(mode=mode, tau=tau))  # type: ignore[arg-type]
    acc: dict[str, list[bool]] = {}
    for i in range(n):
        puzzle = make_puzzle(split_seed(split, 10_000 + i))
        item = make_judge_item(puzzle, rng)
        session = target.open_session(puzzle.image, puzzle.question.text())
        for step in item.prefix:
            target.append(session, step, stop="\n")
        score = target.score(session, item.candidate, stop="\n", judge=target.judge if mode == "judge" else None)
        target.close(session)
        verdict = verifier.verify(score.p_pos, score.p_neg, score.token_logprobs)
        acc.setdefault(item.corruption, []).append(verdict.accepted)
    correct = acc.pop("none", [])
    corrupted = [a for v in acc.values() for a in v]
    return JudgeReport(
        n=n,
        tau=tau,
        accept_correct=sum(correct) / max(1, len(correct)),
        accept_corrupted=sum(corrupted) / max(1, len(corrupted)),
        by_corruption={k: sum(v) / len(v) for k, v in acc.items()},
    )


def evaluate_prefixes(
    target_dir: Path,
    draft_dir: Path,
    split: Split = "test",
    n: int = 100,
    overrides: dict[str, object] | None = None,
    target: TransformersBackend | None = None,
) -> dict[str, float]:
    """TBVM acceptance of the draft's greedy step at every prefix of the target's own
    trajectories on ``n`` puzzles, with the draft's and the target's mean step lengths there:
    the same prefixes for every draft, so two drafts compare step for step. TBVM as the target
    recommends, with ``overrides`` (``mode``, ``tau``) on top. ``target``: the target already
    loaded from ``target_dir``, if it is."""
    target = target or TransformersBackend.from_pretrained(target_dir, device="cpu", name="target")
    draft = TransformersBackend.from_pretrained(draft_dir, device="cpu", name="draft")
    recommended = VerificationConfig.recommended(target.recommended_verification)
    verifier = make_verifier(recommended.model_copy(update=overrides or {}))
    prompts = task_prompts(target, TrajectoryCache(), split, n)
    return {"puzzles": n, **acceptance_at_prefixes(target, draft, prompts, verifier)}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Evaluate demo models on held-out puzzles.")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path)
    parser.add_argument("--methods", default="target_only", help="comma-separated methods (may be empty)")
    parser.add_argument("--split", default="test")
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--judge-n", type=int, default=0)
    parser.add_argument(
        "--prefixes", type=int, default=0, help="also judge the draft's greedy step at every prefix of N puzzles"
    )
    parser.add_argument("--tau", type=float, help="default: what the target recommends")
    parser.add_argument("--verify", choices=["judge", "likelihood"], help="default: what the target recommends")
    parser.add_argument("--json", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("tau", args.tau), ("mode", args.verify)) if v is not None}
    report: dict[str, object] = {
        "command": shlex.join(["dreamr", "zoo", "eval", *argv]),
        "date": date.today().isoformat(),
        "split": args.split,
        "models": {"target": str(args.target), "draft": str(args.draft) if args.draft else None},
    }
    methods = [m for m in args.methods.split(",") if m]
    loaded: TransformersBackend | None = None
    if methods or args.judge_n:
        reasoner = Reasoner.from_pretrained(target=args.target, draft=args.draft, device="cpu")
        verification = reasoner.config.verification.model_copy(update=overrides)
        report["verification"] = {"mode": verification.mode, "tau": verification.tau}
        config = ReasonerConfig(verification=verification, cache=CacheConfig(enabled=False))
        draft = reasoner.draft.backend if reasoner.draft else None
        reasoner = Reasoner(reasoner.target.backend, draft, config=config)
        if isinstance(reasoner.target.backend, TransformersBackend):
            loaded = reasoner.target.backend
        for method in methods:
            r = evaluate_method(reasoner, method, args.split, args.n)  # type: ignore[arg-type]
            report[method] = asdict(r)
            print(json.dumps({k: v for k, v in asdict(r).items() if k != "wrong"}))
        if args.judge_n:
            j = evaluate_judge(
                reasoner.target.backend,  # type: ignore[arg-type]
                verification.tau,
                n=args.judge_n,
                mode=verification.mode,
            )
            report["judge"] = asdict(j)
            print(json.dumps(asdict(j)))
    if args.prefixes and args.draft:
        report["prefixes"] = evaluate_prefixes(
            args.target, args.draft, args.split, args.prefixes, overrides, target=loaded
        )
        print(json.dumps(report["prefixes"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
