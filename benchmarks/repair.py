"""Repairing rejected steps vs rewriting them, in process, on the shipped demo models.

    python benchmarks/repair.py [-n 30] [--out benchmarks/results/repair.md]

Each test puzzle runs target-only, FPSR with repair (``SchedulingConfig.repair``, the default:
a rejected step continues from the draft's start that the target agrees with) and FPSR
rewriting rejected steps (the peers' way), interleaved per puzzle in rotating order, on one
Reasoner (draft in its own process). Reported: total time over all puzzles (what a user with
many questions pays) and the median of per-puzzle ratios, against target-only; accuracy;
target tokens written; steps repaired.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from dreamr_stream import Reasoner
from dreamr_stream.config import CacheConfig, ReasonerConfig
from dreamr_stream.zoo.task import make_puzzle, split_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/repair.md"))
    args = ap.parse_args()
    reasoner = Reasoner.demo()
    base = reasoner.config.model_copy(update={"cache": CacheConfig(enabled=False)})

    def with_repair(on: bool) -> ReasonerConfig:
        return base.model_copy(update={"scheduling": base.scheduling.model_copy(update={"repair": on})})

    runs = {
        "target_only": ("target_only", base),
        "fpsr_repair": ("fpsr", with_repair(True)),
        "fpsr_rewrite": ("fpsr", with_repair(False)),
    }
    names = list(runs)
    wall: dict[str, list[float]] = {k: [] for k in names}
    correct = dict.fromkeys(names, 0)
    target_tokens = dict.fromkeys(names, 0)
    repaired = dict.fromkeys(names, 0)
    probe = make_puzzle(split_seed("val", 0))
    for method, cfg in runs.values():  # warm every path
        reasoner.invoke(probe.image, probe.question.text(), method=method, config=cfg)  # type: ignore[arg-type]
    for i in range(args.n):
        p = make_puzzle(split_seed("test", i))
        for name in names[i % 3 :] + names[: i % 3]:
            method, cfg = runs[name]
            t0 = time.perf_counter()
            r = reasoner.invoke(p.image, p.question.text(), method=method, config=cfg)  # type: ignore[arg-type]
            wall[name].append(time.perf_counter() - t0)
            correct[name] += r.answer == str(p.answer)
            target_tokens[name] += r.stats.target_tokens
            repaired[name] += r.stats.steps_repaired
    ref = wall["target_only"]
    lines = [
        "# Repairing rejected steps vs rewriting them (in process, shipped demo models)",
        "",
        f"`python benchmarks/repair.py -n {args.n}`, {time.strftime('%Y-%m-%d')}: {args.n} test puzzles, "
        "methods interleaved per puzzle in rotating order, one Reasoner, the draft in its own process.",
        "",
        "| method | total s | total-time speedup | median speedup | accuracy | target tokens written "
        "| steps repaired |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        ratios = [a / b for a, b in zip(ref, wall[name], strict=True)]
        lines.append(
            f"| {name} | {sum(wall[name]):.2f} | {sum(ref) / sum(wall[name]):.2f}x | {statistics.median(ratios):.2f}x "
            f"| {correct[name] / args.n:.0%} | {target_tokens[name]} | {repaired[name]} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
