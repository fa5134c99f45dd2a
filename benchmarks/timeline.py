"""Draw the lane timeline of one FPSR request: draft, verification and target work in time.

    python benchmarks/timeline.py [--seed 5] [--fallback on] [--width 100]

Each lane is a row; each character is a slice of wall time, marked with the index of the step
that lane was working on ("." = idle). Written to benchmarks/results/timeline.md.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

from dreamr_stream import CacheConfig, Reasoner, SchedulingConfig
from dreamr_stream.tasks import get_task
from dreamr_stream.types import ReasoningResult

LANES = ("draft", "verify", "target")


def render(result: ReasoningResult, width: int) -> str:
    spans = [s for s in result.stats.timeline if s.what != "prefill"]
    t0 = min(s.start_s for s in spans)
    t1 = max(s.end_s for s in spans)
    scale = width / (t1 - t0)
    lines = [f"time: {t0 * 1000:.0f} ms .. {t1 * 1000:.0f} ms, {(t1 - t0) / width * 1000:.1f} ms per column"]
    for lane in LANES:
        row = ["."] * width
        for s in spans:
            if s.lane != lane:
                continue
            a = int((s.start_s - t0) * scale)
            b = max(a + 1, int((s.end_s - t0) * scale))
            for i in range(a, min(b, width)):
                row[i] = str(s.step % 10)
        lines.append(f"{lane:>7} |{''.join(row)}|")
    marks = [" "] * width
    for step in result.steps:
        i = min(width - 1, int((step.elapsed_s - t0) * scale))
        marks[i] = "^"
    lines.append(f"{'yield':>7} |{''.join(marks)}|")
    for step in result.steps:
        tag = {"draft": "draft, accepted", "cache": "cache"}.get(
            step.source.value, f"target, replacing {step.rejected_draft!r}"
        )
        lines.append(f"  step {step.index} at {step.elapsed_s * 1000:6.0f} ms  {tag}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--fallback", default="on", choices=["on", "off", "auto"])
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "timeline.md")
    args = parser.parse_args()
    base = Reasoner.demo()  # the target's recommended verification settings
    config = base.config.model_copy(
        update={"scheduling": SchedulingConfig(fallback=args.fallback), "cache": CacheConfig(enabled=False)}
    )
    reasoner = Reasoner(base.target.backend, base.draft.backend, config=config)  # type: ignore[union-attr]
    item = get_task().item("test", args.seed)
    reasoner.invoke(item.image, item.question)  # warm-up
    result = reasoner.invoke(item.image, item.question)
    text = render(result, args.width)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/timeline.py --seed {args.seed} --fallback {args.fallback}"
    when = f"{date.today().isoformat()}, shipped target and SAPO draft (`Reasoner.demo()`), after one warm-up request"
    args.out.write_text(f"# One FPSR request on the demo models\n\n`{command}`, {when}\n\n```\n{text}\n```\n")
    print(text)


if __name__ == "__main__":
    main()
