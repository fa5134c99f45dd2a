"""How long ``dreamr reason --random`` takes to show its first verified step, and to exit.

Each run starts ``python -m dreamr_app reason --random`` in a fresh process and reads its
output as it comes: the time to the first step line (a verified or target step: ``  0.35s ✓
draft ...``) counts from just before the process starts; the exit time from its last line to its
end. Beside each run, the floor under the first step of a command that loads the models itself:
a fresh interpreter importing what the target's backend needs (torch, transformers' model and
processor classes), timed the same way; for the daemon's runs it only gauges the machine's load.

What is timed, in this order, all on a warm disk (one ``--no-daemon`` round first reads the files):

* the daemon, cold: the first call, in a fresh runtime folder (``DREAMR_RUNTIME_DIR``), starts the
  resident daemon and waits for it to load the models; reported on its own row;
* the daemon, warm: ``--runs`` calls that reuse it (the default path of ``dreamr reason``);
* in the command: ``--runs`` calls with ``--no-daemon`` (the models loaded by each command);
* ``--before DIR``: a checkout of an older commit (``git worktree add DIR COMMIT``), as it runs.

The rounds are interleaved so that every variant sees the same load on a shared machine; the
daemon is stopped and its folder removed at the end (the user's own daemon is never used).

    python benchmarks/first_step.py --runs 5 --before /tmp/before --out benchmarks/results/first_step.md
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
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


@dataclass(frozen=True)
class Variant:
    name: str
    cwd: Path
    flags: tuple[str, ...] = ()
    daemon: bool = False  # the first step then has no import floor under it


def reason(variant: Variant, seed: int, image: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """First step, exit after the last line, whole command (seconds) of one run."""
    command = [sys.executable, "-m", "dreamr_app", "reason", "--random", "--seed", str(seed), *variant.flags]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*command, "--save-image", str(image)],
        cwd=variant.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
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
        raise RuntimeError(f"dreamr reason failed in {variant.cwd} (exit {code}):\n{''.join(lines)}")
    return first - start, end - last, end - start


def import_floor() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS + "; import os; os._exit(0)"], check=True)
    return time.perf_counter() - start


def timed_run(variant: Variant, seed: int, image: Path, env: dict[str, str]) -> Run:
    return Run(*reason(variant, seed, image, env), import_floor())


def row(label: str, r: Run, daemon: bool) -> str:
    above = "" if daemon else f" {r.first_step_s - r.floor_s:.2f} |"
    return (
        f"| {label} | {r.first_step_s:.2f} | {r.floor_s:.2f} |{above} {r.exit_after_output_s:.2f} | {r.total_s:.2f} |"
    )


def table(variant: Variant, runs: list[Run], cold: Run | None = None) -> str:
    med = statistics.median
    rows = ([row("cold: starts the daemon", cold, True)] if cold is not None else []) + [
        row(str(i + 1), r, variant.daemon) for i, r in enumerate(runs)
    ]
    first, floor = med(r.first_step_s for r in runs), med(r.floor_s for r in runs)
    exit_s, total = med(r.exit_after_output_s for r in runs), med(r.total_s for r in runs)
    above = "" if variant.daemon else f" **{med(r.first_step_s - r.floor_s for r in runs):.2f}** |"
    median = f"| **median of {len(runs)}** | **{first:.2f}** | {floor:.2f} |{above} **{exit_s:.2f}** | {total:.2f} |"
    rows.append(median)
    floor_head = "import floor, load gauge (s)" if variant.daemon else "import floor (s) | first step - floor (s)"
    header = (
        f"| run | first step (s) | {floor_head} | exit after the last line (s) | whole command (s) |\n"
        + "|---" * (5 if variant.daemon else 6)
        + "|"
    )
    flags = " ".join(variant.flags) or "(no flags)"
    return f"## {variant.name}: commit {commit(variant.cwd)}, {flags}\n\n{header}\n" + "\n".join(rows) + "\n"


def report(results: list[tuple[Variant, list[Run]]], cold: Run, loads: tuple[float, float], command: str) -> str:
    head = f"""# dreamr reason --random: time to the first verified step

Command: `{command}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load average
(1 min) {loads[0]:.2f} before and {loads[1]:.2f} after: the machine is shared, so every figure
moves with the load; the import floor, timed right after each run, shows how much. Times from just
before the process starts, on a warm disk (one `--no-daemon` round first); then interleaved rounds
of `python -m dreamr_app reason --random --seed N` (N = 1, 2, ...). Import floor: a fresh
interpreter doing only `{IMPORTS}`.

The daemon's numbered runs reuse the daemon that its cold run started (seed 0, in a fresh runtime
folder): they are warm by design, and the cold row is what the first call of a session costs.
"""
    return head + "\n" + "\n".join(table(v, runs, cold if v.daemon else None) for v, runs in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", type=Path, help="a checkout of an older commit, timed beside this one")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    parser.add_argument("--image", type=Path, default=Path("/tmp/dreamr-first-step.png"), help="puzzle image path")
    args = parser.parse_args()
    variants = [
        Variant("the daemon, warm (dreamr reason's default)", HERE, daemon=True),
        Variant("the models in the command", HERE, ("--no-daemon",)),
    ] + ([Variant("before", args.before.resolve())] if args.before else [])
    results: list[tuple[Variant, list[Run]]] = [(v, []) for v in variants]
    # a runtime folder of its own: never the user's daemon, and a cold start for sure
    runtime = tempfile.mkdtemp(prefix="dr-bench-", dir="/tmp")
    env = {**os.environ, "COLUMNS": "200", "DREAMR_RUNTIME_DIR": runtime}
    load_before = os.getloadavg()[0]
    try:
        for variant in variants[1:]:
            reason(variant, 0, args.image, env)  # warm the disk cache, without starting a daemon
        cold = timed_run(variants[0], 0, args.image, env)
        for seed in range(1, args.runs + 1):
            for variant, runs in results:
                runs.append(timed_run(variant, seed, args.image, env))
    finally:
        stop = [sys.executable, "-m", "dreamr_app", "daemon", "stop"]
        subprocess.run(stop, cwd=HERE, env=env, capture_output=True)
        shutil.rmtree(runtime, ignore_errors=True)
    # the older checkout by its commit (in the table), not by where it lies on this machine
    argv = ["BEFORE_DIR" if args.before and a == str(args.before) else a for a in sys.argv[1:]]
    command = "python benchmarks/first_step.py " + shlex.join(argv)
    text = report(results, cold, (load_before, os.getloadavg()[0]), command)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
