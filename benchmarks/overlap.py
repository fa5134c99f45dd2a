"""Can the draft and the target decode at the same time on this CPU? Threads vs processes.

    python benchmarks/overlap.py [--reps 5]

Decodes 48 tokens at a time with the shipped target and SAPO draft, and reports the median
ms/token of each: alone, then both at once with the draft in a thread of this process or in
its own process (``ProcessBackend``), each with one or two intra-op threads per call. Slowdown
is the ms/token at once over the ms/token alone (1.0: perfect overlap; 2.0: no overlap at all).
Written to ``benchmarks/results/overlap.md``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.process import ProcessBackend
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.tasks import get_task

TOKENS = 48


def per_token_ms(backend: Any, threads: int, reps: int, out: list[float]) -> None:
    """Median ms/token of ``reps`` decodes of ``TOKENS`` tokens (no stop, no end of answer)."""
    item = get_task().item("train", 1)
    backend.use_threads(threads)
    times = []
    for _ in range(reps):
        s = backend.open_session(item.image, item.question)
        t = time.perf_counter()
        backend.generate_step(s, max_tokens=TOKENS, stop="\x00")
        times.append((time.perf_counter() - t) / TOKENS * 1000)
        backend.close(s)
    out.append(statistics.median(times))


def together(target: Any, draft: Any, threads: int, reps: int) -> tuple[float, float]:
    """Both decode at once; the draft, ~9x cheaper per token, runs ~9x as many reps."""
    t_out: list[float] = []
    d_out: list[float] = []
    a = threading.Thread(target=per_token_ms, args=(target, threads, reps, t_out))
    b = threading.Thread(target=per_token_ms, args=(draft, threads, reps * 8, d_out))
    a.start()
    b.start()
    a.join()
    b.join()
    return t_out[0], d_out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    paths = demo_paths("sapo")
    # no stop string: each decode runs its TOKENS tokens (the answer ends far later)
    target = TransformersBackend.from_pretrained(paths.target, device="cpu", name="target")
    draft = TransformersBackend.from_pretrained(paths.draft, device="cpu", name="draft")
    remote = ProcessBackend.from_pretrained(paths.draft, name="draft")
    try:
        alone: dict[tuple[str, int], float] = {}
        for threads in (1, 2):
            for name, b in (("target", target), ("draft", draft)):
                out: list[float] = []
                per_token_ms(b, threads, args.reps, out)
                alone[(name, threads)] = out[0]
        rows = []
        for where, d in (("thread", draft), ("process", remote)):
            for threads in (1, 2):
                if where == "process":  # warm the child's decoding at this thread count
                    per_token_ms(d, threads, 1, [])
                t_ms, d_ms = together(target, d, threads, args.reps)
                rows.append((where, threads, t_ms, d_ms, alone[("target", threads)], alone[("draft", threads)]))
    finally:
        remote.shutdown()
    lines = [
        "# Draft and target decoding at once: threads vs processes",
        "",
        f"`python benchmarks/overlap.py --reps {args.reps}`: median ms/token over {TOKENS}-token decodes,",
        "shipped target and SAPO draft; slowdown = at once / alone (1.0 is perfect overlap).",
        "",
        "| alone | 1 thread | 2 threads |",
        "|---|---|---|",
        f"| target | {alone[('target', 1)]:.2f} | {alone[('target', 2)]:.2f} |",
        f"| draft | {alone[('draft', 1)]:.2f} | {alone[('draft', 2)]:.2f} |",
        "",
        "| draft runs in | threads per call | target ms/token | slowdown | draft ms/token | slowdown |",
        "|---|---|---|---|---|---|",
    ]
    for where, threads, t_ms, d_ms, t_alone, d_alone in rows:
        lines.append(
            f"| {where} | {threads} | {t_ms:.2f} | {t_ms / t_alone:.2f}x | {d_ms:.2f} | {d_ms / d_alone:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
