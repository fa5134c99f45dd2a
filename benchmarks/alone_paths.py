"""The paths to the target alone over a served target, side by side under load.

    python benchmarks/alone_paths.py [--url http://127.0.0.1:8100/v1] [--in-flight 16] [--rounds 6]
                                     [--puzzles 32] [--out benchmarks/results/alone_paths.md]

Three ways one Reasoner answers with the target alone, interleaved round by round (each goes
first in turn): the ``target_only`` method; FPSR on a schedule that sends every request to the
target alone (``ScheduleRow(in_flight=1, lookahead=0)``); and FPSR on the schedule measured on
this machine (speculate at 1 request in flight, alone above), where the first request of each
burst speculates until the others arrive. Reported: every round's wall time and median
latency, and the totals. Why: under load the served bench found FPSR's alone requests slower
than the target-only method's, and this separates the path from the machine's noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import anyio

from dreamr_stream.config import ReasonerConfig, ScheduleRow
from dreamr_stream.reasoner import Method, Reasoner
from dreamr_stream.tasks import TaskItem, items


async def _round(
    r: Reasoner, cfg: ReasonerConfig, method: Method, cases: list[TaskItem], c: int
) -> tuple[float, float]:
    gate = anyio.Semaphore(c)
    latencies: list[float] = []

    async def one(x: TaskItem) -> None:
        async with gate:
            t0 = time.perf_counter()
            await r.ainvoke(x.image, x.question, method=method, config=cfg)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for x in cases:
            tg.start_soon(one, x)
    return time.perf_counter() - t0, statistics.median(latencies)


async def _main(args: argparse.Namespace) -> str:
    r = Reasoner.demo(target_url=args.url)
    try:
        base = r.config.override(cache=False)
        variants: list[tuple[str, ReasonerConfig, Method]] = [
            ("target_only", base, "target_only"),
            (
                "FPSR, every request alone",
                base.override(scheduling={"schedule": (ScheduleRow(in_flight=1, lookahead=0),)}),
                "fpsr",
            ),
            (
                "FPSR, speculating at 1 in flight",
                base.override(scheduling={"schedule": (ScheduleRow(in_flight=1, lookahead=1),)}),
                "fpsr",
            ),
        ]
        cases = list(items("grid", "test", args.puzzles, start=100))
        for _, cfg, m in variants:  # warm each path
            await r.ainvoke(cases[0].image, cases[0].question, method=m, config=cfg)
        walls: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        lines = []
        for rnd in range(args.rounds):
            for name, cfg, m in variants[rnd % 3 :] + variants[: rnd % 3]:
                wall, median = await _round(r, cfg, m, cases, args.in_flight)
                walls[name].append(wall)
                lines.append(f"| {rnd} | {name} | {wall:.2f} | {median:.2f} |")
                print(lines[-1], flush=True)
    finally:
        r.close()
    out = [
        "# The paths to the target alone under load",
        "",
        f"`python benchmarks/alone_paths.py --in-flight {args.in_flight} --rounds {args.rounds} "
        f"--puzzles {args.puzzles}`, "
        f"{time.strftime('%Y-%m-%d')}, one vLLM server (`python -m dreamr_vllm`), test puzzles from 100, each round "
        "all puzzles with that many in flight, the variants' order rotating.",
        "",
        "| round | variant | wall s | median latency s |",
        "|---|---|---|---|",
        *lines,
        "",
        "| variant | total wall s | median round s |",
        "|---|---|---|",
        *(f"| {k} | {sum(v):.2f} | {statistics.median(v):.2f} |" for k, v in walls.items()),
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8100/v1")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--puzzles", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/alone_paths.md"))
    args = parser.parse_args()
    text = anyio.run(_main, args)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
