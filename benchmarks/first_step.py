"""How long ``dreamr reason --random`` takes to show its first verified step, and to exit.

Each run starts ``python -m dreamr_stream.cli reason --random`` in a fresh process and reads its
output as it comes: the time to the first step line (a verified or target step: ``  0.35s ✓
draft ...``) counts from just before the process starts; the exit time from its last line to its
end. Beside each run, the floor under the first step: a fresh interpreter importing what the
target's backend needs (torch, transformers' model and processor classes), timed the same way.
One round first warms the disk cache; then ``--runs`` timed rounds, medians reported.

``--before DIR`` also times a checkout of an older commit (``git worktree add DIR COMMIT``), its
runs interleaved with this checkout's so that both see the same load on a shared machine.

    python benchmarks/first_step.py --runs 5 --before /tmp/before --out benchmarks/results/first_step.md
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

STEP_LINE = re.compile(r"^\s*\d+\.\d+s [✓●]")  # dreamr reason's line for a step that holds
IMPORTS = "import torch; from transformers import AutoModelForImageTextToText, AutoProcessor"
HERE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    first_step_s: float
    exit_after_output_s: float
    total_s: float
    floor_s: float


def commit(cwd: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True)
    status = ["git", "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, cwd=cwd, capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def reason(cwd: Path, seed: int, image: Path) -> tuple[float, float, float]:
    """First step, exit after the last line, whole command (seconds) of one run in ``cwd``."""
    command = [sys.executable, "-m", "dreamr_stream.cli", "reason", "--random", "--seed", str(seed)]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*command, "--save-image", str(image)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    first = last = None
    lines = []
    for line in proc.stdout:
        last = time.perf_counter()
        lines.append(line)
        if first is None and STEP_LINE.match(line):
            first = last
    code = proc.wait()
    end = time.perf_counter()
    if code != 0 or first is None or last is None:
        raise RuntimeError(f"dreamr reason failed in {cwd} (exit {code}):\n{''.join(lines)}")
    return first - start, end - last, end - start


def import_floor() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS + "; import os; os._exit(0)"], check=True)
    return time.perf_counter() - start


def timed_run(cwd: Path, seed: int, image: Path) -> Run:
    return Run(*reason(cwd, seed, image), import_floor())


def table(name: str, cwd: Path, runs: list[Run]) -> str:
    med = statistics.median
    rows = [
        f"| {i + 1} | {r.first_step_s:.2f} | {r.floor_s:.2f} | {r.first_step_s - r.floor_s:.2f} | "
        f"{r.exit_after_output_s:.2f} | {r.total_s:.2f} |"
        for i, r in enumerate(runs)
    ]
    first, floor = med(r.first_step_s for r in runs), med(r.floor_s for r in runs)
    above = med(r.first_step_s - r.floor_s for r in runs)
    exit_s, total = med(r.exit_after_output_s for r in runs), med(r.total_s for r in runs)
    rows.append(f"| **median** | **{first:.2f}** | {floor:.2f} | **{above:.2f}** | **{exit_s:.2f}** | {total:.2f} |")
    header = (
        "| run | first step (s) | import floor (s) | first step - floor (s) | exit after the last line (s) "
        "| whole command (s) |\n|---|---|---|---|---|---|"
    )
    return f"## {name}: commit {commit(cwd)}\n\n{header}\n" + "\n".join(rows) + "\n"


def report(results: dict[str, tuple[Path, list[Run]]], loads: tuple[float, float], command: str) -> str:
    head = f"""# dreamr reason --random: time to the first verified step

Command: `{command}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load average
(1 min) {loads[0]:.2f} before and {loads[1]:.2f} after: the machine is shared, so every figure
moves with the load; the import floor, timed right after each run, shows how much. Times from just
before the process starts; one warm-up round, then interleaved rounds of
`python -m dreamr_stream.cli reason --random --seed N` (N = 1, 2, ...). Import floor: a fresh
interpreter doing only `{IMPORTS}`.
"""
    return head + "\n" + "\n".join(table(name, cwd, runs) for name, (cwd, runs) in results.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", type=Path, help="a checkout of an older commit, timed beside this one")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    parser.add_argument("--image", type=Path, default=Path("/tmp/dreamr-first-step.png"), help="puzzle image path")
    args = parser.parse_args()
    checkouts = {"this checkout": HERE} | ({"before": args.before.resolve()} if args.before else {})
    results: dict[str, tuple[Path, list[Run]]] = {name: (cwd, []) for name, cwd in checkouts.items()}
    load_before = os.getloadavg()[0]
    for cwd in checkouts.values():
        reason(cwd, 0, args.image)  # warm the disk cache
    for seed in range(1, args.runs + 1):
        for cwd, runs in results.values():
            runs.append(timed_run(cwd, seed, args.image))
    # the older checkout by its commit (in the table), not by where it lies on this machine
    argv = ["BEFORE_DIR" if args.before and a == str(args.before) else a for a in sys.argv[1:]]
    command = "python benchmarks/first_step.py " + shlex.join(argv)
    text = report(results, (load_before, os.getloadavg()[0]), command)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
