"""``dreamr bench``'s results: the value it measures, and its table, JSON and plot.

Apart from the measuring (``dreamr_stream.bench``), so that what reads or shows results (the
command line, the benchmark index) needs no models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BenchResult", "save", "to_markdown"]


@dataclass
class BenchResult:
    config: dict[str, Any]
    costs: dict[str, float]
    methods: dict[str, dict[str, Any]]


def to_markdown(result: BenchResult) -> str:
    def f(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    header = [
        "method",
        "TBVM",
        "accuracy",
        "faithful",
        "acceptance",
        "wall median s (IQR)",
        "speedup",
        "total-time speedup",
        "ideal",
        "efficiency",
        "first step s",
        "target fwd",
        "draft fwd",
        "rejected step cost",
        "tok/s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, r in result.methods.items():
        iqr = f"{r['wall_median_s']:.2f} ({r['wall_iqr_s'][0]:.2f}-{r['wall_iqr_s'][1]:.2f})"
        cells = [
            m,
            r.get("tbvm") or "-",
            f"{r['accuracy']:.1%}",
            f(r.get("faithfulness"), "{:.1%}"),
            f(r["acceptance"], "{:.1%}"),
            iqr,
            f(r.get("speedup_median"), "{:.2f}x"),
            f(r.get("speedup_total"), "{:.2f}x"),
            f(r.get("ideal_speedup"), "{:.2f}x"),
            f(r.get("efficiency"), "{:.0%}"),
            f(r["first_step_median_s"]),
            f(r["target_forwards_per_prompt"], "{:.0f}"),
            f(r["draft_forwards_per_prompt"], "{:.0f}"),
            f(r.get("rejected_step_cost"), "{:.0%}"),
            f"{r['tokens_per_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    c = result.costs
    lines.append("")
    lines.append(
        f"Costs: target {c['target_s_per_token'] * 1000:.2f} ms/token, "
        f"draft {c['draft_s_per_token'] * 1000:.2f} ms/token (c = {c['c']:.3f}), "
        f"20-token scoring forward {c['score_s'] * 1000:.1f} ms (v = {c['v']:.2f} target tokens). "
        f"Faithful: the share of right answers whose every step is the reference's. "
        f"n = {result.config['n']} test prompts of task {result.config.get('task', 'grid')}, "
        f"device {result.config['device']}, "
        f"TBVM as the target recommends: {result.config['verification']['mode']} mode, "
        f"tau {result.config['verification']['tau']:g}."
    )
    return "\n".join(lines) + "\n"


def save(result: BenchResult, folder: Path, tag: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"bench_{tag}.json").write_text(
        json.dumps({"config": result.config, "costs": result.costs, "methods": result.methods}, indent=2) + "\n"
    )
    (folder / f"bench_{tag}.md").write_text(to_markdown(result))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(result.methods)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    ax1.bar(names, [result.methods[m].get("speedup_median", 0) for m in names], color="#3b7dd8")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_ylabel("speedup vs target-only (median)")
    ax2.bar(names, [result.methods[m]["accuracy"] * 100 for m in names], color="#48a868")
    ax2.set_ylabel("final-answer accuracy (%)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(folder / f"bench_{tag}.png", dpi=110)
