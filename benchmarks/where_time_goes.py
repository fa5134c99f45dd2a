"""Where the time of one request goes: lane busy time, overlap and engine overhead.

    python benchmarks/where_time_goes.py [--draft sapo] [-n 10] [--method fpsr] [--no-split]
                                         [--fallback on|off|auto]

For each request the engine records a timeline of lane spans (prefill, draft writes, target
verification, the target's own steps, draft resyncs). This script sums them per lane and kind,
measures how much of the wall time at least one lane was busy (the union) and how much two
lanes ran at once (overlap), and reports the rest as engine overhead (scheduling, thread hops,
Python between model calls). Medians over ``n`` test puzzles, beside target-only on the same
puzzles, written to ``benchmarks/results/where_time_goes_<method>_<draft>[_nosplit][_fallback-<mode>].md``.
``--fallback on`` forces the target's speculative fallback lane (``SchedulingConfig(fallback="on")``;
by default it runs only on a GPU), to measure what it costs or saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict
from datetime import date
from pathlib import Path

from dreamr_stream import CacheConfig, Reasoner, SchedulingConfig
from dreamr_stream.backends.shipped import default_draft
from dreamr_stream.tasks import get_task, items
from dreamr_stream.types import LaneSpan, ReasoningResult


def _union(spans: list[LaneSpan]) -> float:
    """Seconds covered by at least one span."""
    total, end = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start_s):
        if s.start_s > end:
            total += s.end_s - s.start_s
            end = s.end_s
        elif s.end_s > end:
            total += s.end_s - end
            end = s.end_s
    return total


def breakdown(result: ReasoningResult) -> dict[str, float]:
    """Seconds per lane/kind, busy union, overlap and overhead of one request."""
    spans = result.stats.timeline
    out: dict[str, float] = defaultdict(float)
    for s in spans:
        out[f"{s.lane}:{s.what}"] += s.end_s - s.start_s
    busy = _union(spans)
    out["busy (any lane)"] = busy
    out["overlap (two lanes at once)"] = sum(s.end_s - s.start_s for s in spans) - busy
    out["overhead (no model call)"] = result.stats.wall_s - busy
    out["wall"] = result.stats.wall_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", help="shipped draft: sft or sapo (default: the demo's)")
    parser.add_argument("--method", default="fpsr", choices=["fpsr", "sequential"])
    parser.add_argument("-n", type=int, default=10)
    parser.add_argument(
        "--no-split", action="store_true", help="each model's calls keep every CPU thread (engine.threads)"
    )
    parser.add_argument(
        "--fallback",
        choices=["on", "off", "auto"],
        help="force the target's speculative fallback lane on or off (default: the Reasoner's, auto)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other processes on the machine skew the times
    base = Reasoner.demo(draft=args.draft)
    args.draft = args.draft or default_draft()
    update: dict[str, object] = {"cache": CacheConfig(enabled=False)}
    if args.fallback:
        update["scheduling"] = SchedulingConfig(**{**base.config.scheduling.model_dump(), "fallback": args.fallback})
    config = base.config.model_copy(update=update)
    reasoner = Reasoner(
        base.target.backend,
        base.draft.backend,  # type: ignore[union-attr]
        config=config,
        split_threads=not args.no_split,
    )
    task = get_task()
    warm = task.item("val", 0)
    reasoner.invoke(warm.image, warm.question, method=args.method)
    rows: dict[str, list[float]] = defaultdict(list)
    ratio = []
    per_request: list[dict[str, float]] = []
    for p in items(task, "test", args.n):
        spec = reasoner.invoke(p.image, p.question, method=args.method)
        alone = reasoner.invoke(p.image, p.question, method="target_only")
        ratio.append(alone.stats.wall_s / spec.stats.wall_s)
        per_request.append(breakdown(spec))
        rows["target-only wall"].append(alone.stats.wall_s)
        rows["acceptance"].append(spec.stats.draft_steps_accepted / max(1, spec.stats.draft_steps_judged))
    for key in {k for parts in per_request for k in parts}:  # a part absent from a request counts as 0 s
        rows[key] = [parts.get(key, 0.0) for parts in per_request]
    tag = ("_nosplit" if args.no_split else "") + (f"_fallback-{args.fallback}" if args.fallback else "")
    command = (
        f"python benchmarks/where_time_goes.py --draft {args.draft} --method {args.method} -n {args.n}"
        + (" --no-split" if args.no_split else "")
        + (f" --fallback {args.fallback}" if args.fallback else "")
    )
    lines = [
        f"# Where the time of one {args.method} request goes ({args.draft} draft"
        + (", threads not split" if args.no_split else "")
        + (f", fallback {args.fallback}" if args.fallback else "")
        + ")",
        "",
        f"`{command}`, {date.today().isoformat()}, shipped target and {args.draft} draft, "
        f"1-minute load average before the run {load_before:.2f}: medians over {args.n} test puzzles; "
        "seconds unless noted. A lane's time",
        "runs from asking for its model to the result, so it includes waiting for the model's",
        "priority lock while another lane computes; overlap is time two lanes were both in a call.",
        "",
        "| part | median | share of wall |",
        "|---|---|---|",
    ]
    wall = statistics.median(rows["wall"])
    for key in sorted(rows, key=lambda k: (k in ("wall", "target-only wall", "acceptance"), k)):
        med = statistics.median(rows[key])
        share = f"{med / wall:.0%}" if key not in ("acceptance", "target-only wall") else ""
        lines.append(f"| {key} | {med:.3f} | {share} |")
    total = sum(rows["target-only wall"]) / sum(rows["wall"])
    lines += [
        "",
        f"Speedup vs target-only on the same puzzles (median of ratios): {statistics.median(ratio):.2f}x; "
        f"in total time: {total:.2f}x.",
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"where_time_goes_{args.method}_{args.draft}{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
