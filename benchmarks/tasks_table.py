"""Both tasks side by side: the ``dreamr bench`` figures of each task's run in one table.

    python benchmarks/tasks_table.py [--results benchmarks/results] [--out benchmarks/results/bench_tasks.md]

Reads each task's bench file (``bench_cpu_<task>.json``, from ``dreamr bench --task <task>``;
the grid's with ``--tag cpu_grid``, beside the grid's full run ``bench_cpu.json``) and writes one
table: per method, each task's accuracy, faithfulness (right answers whose every step is the
reference's), acceptance, and total-time and median speedups against the target alone. Nothing
is measured here: the figures are the bench files', so a row is as old as its file (each file's
date and command are in the table's notes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# the rows of the comparison, in the order a reader weighs them: the baseline, what a user of
# transformers runs instead, SpecReason's schedule with and without repair, FPSR with each draft
METHODS: dict[str, str] = {
    "target_only": "target alone",
    "assisted": "HF assisted generation (token level)",
    "sequential_sft": "SpecReason's schedule, SFT draft, rejected steps rewritten",
    "sequential_sapo": "SpecReason's schedule, SAPO draft, rejected steps rewritten",
    "sequential_sapo_repair": "SpecReason's schedule, SAPO draft, rejected steps repaired",
    "fpsr_sft": "FPSR, SFT draft",
    "fpsr_sapo": "FPSR, SAPO draft",
    "draft_only": "SFT draft alone, unverified",
}
FIGURES = ("accuracy", "faithfulness", "acceptance", "speedup_total", "speedup_median")


def bench_file(results: Path, task: str) -> Path:
    """The bench file of ``task`` in ``results``."""
    return results / f"bench_cpu_{task}.json"


def _cell(figure: str, value: Any) -> str:
    if value is None:
        return "-"
    if figure.startswith("speedup"):
        return f"{value:.2f}x"
    return f"{value:.0%}" if figure == "acceptance" else f"{value:.1%}"


def table(runs: dict[str, dict[str, Any]]) -> str:
    """The markdown table of ``runs`` (task -> bench JSON), a column group per task."""
    tasks = list(runs)
    heads = {
        "accuracy": "accuracy",
        "faithfulness": "faithful",
        "acceptance": "acceptance",
        "speedup_total": "total-time speedup",
        "speedup_median": "median speedup",
    }
    header = ["method"] + [f"{task}: {heads[f]}" for f in FIGURES for task in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, label in METHODS.items():
        if not any(method in run["methods"] for run in runs.values()):
            continue
        cells = [label]
        for figure in FIGURES:
            for task in tasks:
                row = runs[task]["methods"].get(method)
                cells.append(_cell(figure, None if row is None else row.get(figure)))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for task, run in runs.items():
        cfg, costs = run["config"], run["costs"]
        v = cfg["verification"]
        notes.append(
            f"- {task}: n = {cfg['n']} test items, TBVM {v['mode']} at tau {v['tau']:g}, "
            f"target {costs['target_s_per_token'] * 1000:.1f} ms/token, draft "
            f"{costs['draft_s_per_token'] * 1000:.1f} ms/token (c = {costs['c']:.2f}); "
            f"{run.get('source', '')}"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tasks", default="grid,charts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_tasks.md"))
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, Any]] = {}
    for task in args.tasks.split(","):
        path = bench_file(args.results, task)
        runs[task] = json.loads(path.read_text()) | {"source": f"`{path.name}`"}
    text = "# Both tasks side by side (`dreamr bench`)\n\n" + table(runs)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
