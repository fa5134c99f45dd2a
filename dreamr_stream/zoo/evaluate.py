"""Measure the demo models on held-out puzzles of a task (the grid task's unless told), through
the real engine paths.

* final-answer accuracy of a method (target-only, draft-only, FPSR, ...) on a split;
* TBVM step acceptance of a draft (FPSR stats: accepted / judged);
* TBVM in both modes against ground truth (``zoo/tbvm_eval.py``): on the judge set and on the
  draft's real steps at the target's prefixes, each mode at its own tau.

``--modes judge,likelihood`` runs the methods in each mode (the recommended mode's reports keep
the method's name, the other's are ``<method>_<mode>``).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import anyio

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.registry import capabilities_of
from dreamr_stream.config import CacheConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.reasoner import UNVERIFIED_METHODS, Method, Reasoner
from dreamr_stream.sapo.acceptance import acceptance_of, scored_greedy_steps, verdicts_of
from dreamr_stream.sapo.prompts import TrajectoryCache
from dreamr_stream.tasks import DEFAULT_TASK, Split, Task, TaskLike, as_task, get_task, items
from dreamr_stream.verify import make_verifier
from dreamr_stream.zoo.prompts import task_prompts
from dreamr_stream.zoo.tbvm_eval import MODES, Labelled, judge_set_scored, labelled_steps, tbvm_report

__all__ = ["MethodReport", "evaluate_method", "evaluate_prefixes", "evaluate_tbvm"]


@dataclass
class MethodReport:
    method: str
    n: int
    mode: str  # TBVM's
    accuracy: float
    acceptance: float | None
    mean_steps: float
    mean_wall_s: float
    mean_draft_step_words: float | None = None
    wrong: list[int] = field(default_factory=list)


async def _method(reasoner: Reasoner, method: Method, split: Split, n: int, task: Task) -> MethodReport:
    correct = judged = accepted = steps = 0
    wall = 0.0
    draft_words = draft_steps = 0
    wrong = []
    for item in items(task, split, n):
        result = await reasoner.ainvoke(item.image, item.question, method=method)
        got = task.parse_answer(result.steps[-1].text) if result.steps else None
        if got == item.answer:
            correct += 1
        else:
            wrong.append(item.index)
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
        mode=reasoner.config.verification.mode,
        accuracy=correct / n,
        acceptance=accepted / judged if judged else None,
        mean_steps=steps / n,
        mean_wall_s=wall / n,
        mean_draft_step_words=draft_words / draft_steps if draft_steps else None,
        wrong=wrong,
    )


def evaluate_method(
    reasoner: Reasoner, method: Method, split: Split = "test", n: int = 100, *, task: TaskLike = DEFAULT_TASK
) -> MethodReport:
    """``method`` on the first ``n`` items of ``split`` of ``task``, answers read by the task."""
    return anyio.run(_method, reasoner, method, split, n, as_task(task))


def evaluate_tbvm(sets: Mapping[str, Sequence[Labelled]], taus: Mapping[str, float]) -> dict[str, dict[str, object]]:
    """TBVM's report in each mode of ``taus`` (at that tau) on each set of labelled steps."""
    return {name: {m: asdict(tbvm_report(items, m, tau)) for m, tau in taus.items()} for name, items in sets.items()}


def evaluate_prefixes(
    target: TransformersBackend,
    draft: TransformersBackend,
    verification: VerificationConfig,
    split: Split,
    n: int,
    *,
    task: TaskLike = DEFAULT_TASK,
) -> tuple[dict[str, float], list[Labelled]]:
    """The draft's greedy step at every prefix of the target's own trajectories on ``n`` puzzles
    (the same prefixes for every draft, so two drafts compare step for step), scored once with
    the judge suffix, so that every TBVM mode reads the same forward: TBVM acceptance as
    ``verification`` with the draft's and the target's mean step lengths there
    (``acceptance_of``), and the steps labelled for ``evaluate_tbvm``."""
    prompts = task_prompts(target, TrajectoryCache(), split, n, task=task)
    steps = list(scored_greedy_steps(target, draft, prompts, judge=True))
    verdicts = verdicts_of(steps, draft, make_verifier(verification))
    return {"puzzles": n, **acceptance_of(verdicts, prompts, draft)}, labelled_steps(steps, prompts)


def _run_methods(
    reasoner: Reasoner,
    verification: VerificationConfig,
    methods: list[str],
    split: Split,
    n: int,
    suffix: str,
    task: Task,
) -> dict[str, object]:
    """``methods`` on a Reasoner of ``reasoner``'s models with TBVM as ``verification`` (with a
    ``suffix``, only those that verify)."""
    config = ReasonerConfig(verification=verification, cache=CacheConfig(enabled=False))
    draft = reasoner.draft.backend if reasoner.draft else None
    run = Reasoner(reasoner.target.backend, draft, config=config)  # the models stay open
    out: dict[str, object] = {}
    try:
        for method in methods:
            if suffix and method in UNVERIFIED_METHODS:  # one run, in the recommended mode
                continue
            r = evaluate_method(run, method, split, n, task=task)  # type: ignore[arg-type]
            out[method + suffix] = asdict(r)
            print(json.dumps({k: v for k, v in asdict(r).items() if k != "wrong"}))
    finally:
        run.close()
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Evaluate demo models on held-out puzzles.")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path)
    parser.add_argument("--task", default=DEFAULT_TASK, help="the task whose items to evaluate on")
    parser.add_argument("--methods", default="target_only", help="comma-separated methods (may be empty)")
    parser.add_argument("--split", default="test")
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--judge-n", type=int, default=0, help="TBVM on N judge-set items, in every mode of --modes")
    parser.add_argument(
        "--prefixes",
        type=int,
        default=0,
        help="judge the draft's greedy step at every prefix of N puzzles (acceptance, and TBVM against the "
        "target's own step in every mode of --modes)",
    )
    parser.add_argument("--tau", type=float, help="default: what the target recommends")
    parser.add_argument("--verify", choices=MODES, help="default: what the target recommends")
    parser.add_argument(
        "--modes", default="", help="also run the methods and TBVM reports in these modes (comma-separated)"
    )
    parser.add_argument("--json", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("tau", args.tau), ("mode", args.verify)) if v is not None}
    task = get_task(args.task)
    report: dict[str, object] = {
        "command": shlex.join(["dreamr", "zoo", "eval", *argv]),
        "date": date.today().isoformat(),
        "task": task.name,
        "split": args.split,
        "models": {"target": str(args.target), "draft": str(args.draft) if args.draft else None},
    }
    reasoner = Reasoner.from_pretrained(target=args.target, draft=args.draft, device="cpu")
    target = reasoner.target.backend
    assert isinstance(target, TransformersBackend)
    recommended = capabilities_of(target).recommended_verification
    verification = VerificationConfig.recommended(recommended, **overrides)
    report["verification"] = {"mode": verification.mode, "tau": verification.tau}
    modes = [verification.mode] + [m for m in args.modes.split(",") if m and m != verification.mode]
    per_mode = {m: VerificationConfig.recommended(recommended, mode=m) for m in modes}
    per_mode[verification.mode] = verification
    methods = [m for m in args.methods.split(",") if m]
    for mode, v in per_mode.items():
        suffix = "" if v is verification else f"_{mode}"
        report.update(_run_methods(reasoner, v, methods, args.split, args.n, suffix, task))
    sets: dict[str, list[Labelled]] = {}
    if args.judge_n:
        sets["judge_set"] = judge_set_scored(target, args.split, args.judge_n, task=task)
    if args.prefixes and args.draft:
        draft = TransformersBackend.from_pretrained(args.draft, device="cpu", name="draft")
        report["prefixes"], sets["draft_steps"] = evaluate_prefixes(
            target, draft, verification, args.split, args.prefixes, task=task
        )
        print(json.dumps(report["prefixes"]))
    if sets:
        report["tbvm"] = evaluate_tbvm(sets, {m: v.tau for m, v in per_mode.items()})
        print(json.dumps(report["tbvm"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
