"""What a batched draft step costs: ``generate_batch`` at batch 1, 4, 16 and 32.

    python benchmarks/draft_batch.py [--reps 7] [--chunks 4] [--process]

The shipped SAPO draft in this process on one intra-op thread (``torch.set_num_threads(1)``),
sessions opened on grid test puzzles, greedy chunks of 8 tokens (``DRAFT_CHUNK_TOKENS``, as the
engine's draft lane asks for them). Two measures, each the median of ``--reps`` repetitions, the
batch sizes interleaved within each repetition:

* *decode*: every row decodes ``--chunks`` chunks of exactly 8 tokens (a stop string that never
  appears, so no row leaves): the cost of one batched forward (one decode step of every row) and
  of one token per row. The issue's target: a decode step at batch 16 costs at most 2x one at
  batch 1;
* *steps*: every row writes two whole reasoning steps, in chunks of 8, with the real delimiter:
  rows leave the batch at the end of their step (a delimiter, a cap) and the next call takes each
  row that has steps left, as the model runner gathers them. The cost of one written token;
* *model forward alone* (in process): the batched forward with no decoding loop around it (one
  fixed token per row), the floor under the decode measure.

Times are medians; each "vs batch 1" is the median over repetitions of the ratio within one
repetition (both measured minutes apart at most, so a machine shared with other work loads both).

Batch 1 is a plain ``generate_step`` (what the runner issues for a call that is alone).
``--process`` measures the same through ``ProcessBackend`` (the draft in its own process, one
message per batch). Written to ``benchmarks/results/draft_batch.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from dreamr_stream import tasks
from dreamr_stream.backends import hf_batch
from dreamr_stream.backends.base import StepCall
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.process import ProcessBackend
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.engine.calls import DRAFT_CHUNK_TOKENS

SIZES = (1, 4, 16, 32)
NEVER = "\x00"  # a stop string no step contains: rows decode their whole chunk
STEPS = 2


def run_calls(backend: Any, calls: list[StepCall]) -> list[Any]:
    if len(calls) == 1:  # alone: the plain call, as the runner makes it
        c = calls[0]
        return [backend.generate_step(c.session, max_tokens=c.max_tokens, stop=c.stop, budget=c.budget)]
    return list(backend.generate_batch(calls))


def decode(backend: Any, items: list[Any], chunks: int) -> tuple[float, int]:
    """Seconds for ``chunks`` chunks of 8 tokens on every row, and the tokens decoded."""
    sessions = [backend.open_session(it.image, it.question) for it in items]
    calls = [StepCall(s, 10_000, NEVER, budget=DRAFT_CHUNK_TOKENS) for s in sessions]
    tokens = 0
    t = time.perf_counter()
    for _ in range(chunks):
        tokens += sum(o.new_tokens for o in run_calls(backend, calls))
    seconds = time.perf_counter() - t
    for s in sessions:
        backend.close(s)
    return seconds, tokens


def model_forward(backend: TransformersBackend, items: list[Any], forwards: int) -> float:
    """Seconds per batched forward of the model alone (``PaddedCache.forward``, one fixed token
    per row, no decoding loop around it): the floor under the decode measure."""
    sessions = [backend.open_session(it.image, it.question) for it in items]
    with torch.inference_mode():
        batch = hf_batch.PaddedCache([hf_batch.Row(StepCall(s, 10_000, NEVER)) for s in sessions], backend.model.config)
        tokens = [5] * len(sessions)
        t = time.perf_counter()
        for _ in range(forwards):
            batch.forward(backend.model, tokens)
        seconds = (time.perf_counter() - t) / forwards
    for s in sessions:
        backend.close(s)
    return seconds


def steps(backend: Any, items: list[Any]) -> tuple[float, int, int]:
    """Seconds for every row to write ``STEPS`` whole steps in chunks of 8, the tokens written
    and the calls made."""
    sessions = [backend.open_session(it.image, it.question) for it in items]
    left = [STEPS] * len(sessions)
    tokens = calls_made = 0
    t = time.perf_counter()
    while any(left):
        rows = [i for i, n in enumerate(left) if n]
        outs = run_calls(backend, [StepCall(sessions[i], 96, "\n", budget=DRAFT_CHUNK_TOKENS) for i in rows])
        calls_made += 1
        for i, o in zip(rows, outs, strict=True):
            tokens += o.new_tokens
            if o.done:
                left[i] = 0 if o.eos else left[i] - 1
    seconds = time.perf_counter() - t
    for s in sessions:
        backend.close(s)
    return seconds, tokens, calls_made


def measure(backend: Any, reps: int, chunks: int, label: str) -> dict[str, Any]:
    items = list(tasks.items("grid", "test", max(SIZES)))
    decode(backend, items[:4], 1)  # warm up
    runs: dict[int, dict[str, list[float]]] = {
        b: {"forward_ms": [], "token_ms": [], "step_token_ms": [], "model_forward_ms": []} for b in SIZES
    }
    calls: dict[int, int] = {}
    for rep in range(reps):
        order = SIZES[rep % len(SIZES) :] + SIZES[: rep % len(SIZES)]  # interleaved, rotated
        for b in order:  # each measure for every size back to back, so that they share the load
            seconds, tokens = decode(backend, items[:b], chunks)
            forwards = chunks * DRAFT_CHUNK_TOKENS
            runs[b]["forward_ms"].append(seconds / forwards * 1000)
            runs[b]["token_ms"].append(seconds / tokens * 1000)
        for b in order:
            seconds, tokens, calls[b] = steps(backend, items[:b])
            runs[b]["step_token_ms"].append(seconds / tokens * 1000)
        for b in order:
            if isinstance(backend, TransformersBackend):
                forwards = chunks * DRAFT_CHUNK_TOKENS
                runs[b]["model_forward_ms"].append(model_forward(backend, items[:b], forwards) * 1000)
        print(f"{label}: repetition {rep + 1}/{reps} done", file=sys.stderr)

    def ratio(b: int, key: str, inverse: bool = False) -> float:
        """The median over repetitions of batch ``b``'s ``key`` over batch 1's in the same one."""
        pairs = zip(runs[b][key], runs[1][key], strict=True)
        return statistics.median(one / mine if inverse else mine / one for mine, one in pairs)

    rows = {}
    for b in SIZES:
        med = {k: statistics.median(v) if v else None for k, v in runs[b].items()}
        rows[b] = {**med, "calls_for_steps": calls[b], "samples": runs[b]}
        rows[b]["forward_vs_batch_1"] = ratio(b, "forward_ms")
        rows[b]["throughput_vs_batch_1"] = ratio(b, "token_ms", inverse=True)
        rows[b]["step_throughput_vs_batch_1"] = ratio(b, "step_token_ms", inverse=True)
        if runs[b]["model_forward_ms"]:
            rows[b]["model_forward_vs_batch_1"] = ratio(b, "model_forward_ms")
    return {"where": label, "rows": {str(b): r for b, r in rows.items()}}


def table(result: dict[str, Any]) -> list[str]:
    floor = result["rows"]["1"]["model_forward_ms"] is not None
    lines = [
        f"### {result['where']}",
        "",
        "| batch | ms per batched forward | vs batch 1 | ms per token per row (decode) | tokens/s vs batch 1 "
        "| ms per token, whole steps | vs batch 1 | calls for the steps |"
        + (" model forward alone, ms | vs batch 1 |" if floor else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if floor else ""),
    ]
    for b, r in result["rows"].items():
        lines.append(
            f"| {b} | {r['forward_ms']:.2f} | {r['forward_vs_batch_1']:.2f}x | {r['token_ms']:.3f} "
            f"| {r['throughput_vs_batch_1']:.1f}x | {r['step_token_ms']:.3f} | {r['step_throughput_vs_batch_1']:.1f}x "
            f"| {r['calls_for_steps']} |"
            + (f" {r['model_forward_ms']:.2f} | {r['model_forward_vs_batch_1']:.2f}x |" if floor else "")
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--chunks", type=int, default=4, help="chunks of 8 tokens per row in the decode measure")
    parser.add_argument("--process", action="store_true", help="also through ProcessBackend (the draft's own process)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = demo_paths("sapo")
    load = os.getloadavg()
    results = [
        measure(
            TransformersBackend.from_pretrained(paths.draft, device="cpu", name="draft"),
            args.reps,
            args.chunks,
            "in process",
        )
    ]
    if args.process:
        remote = ProcessBackend.from_pretrained(paths.draft, name="draft")
        try:
            remote.use_threads(1)
            results.append(measure(remote, args.reps, args.chunks, "ProcessBackend (child process)"))
        finally:
            remote.shutdown()
    command = "python benchmarks/draft_batch.py " + " ".join(sys.argv[1:])
    r16 = results[0]["rows"]["16"]["forward_vs_batch_1"]
    info = {
        "command": command.strip(),
        "date": date.today().isoformat(),
        "model": str(paths.draft.name),
        "torch_threads": 1,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_before": load,
        "load_average_after": os.getloadavg(),
        "chunk_tokens": DRAFT_CHUNK_TOKENS,
        "target": "a decode step at batch 16 costs at most 2x one at batch 1",
        "target_met": r16 <= 2.0,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft_batch.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        "# Batched draft steps: cost per batched forward and per token",
        "",
        f"`{info['command']}` ({info['date']}, shipped `{info['model']}`, 1 intra-op thread, {info['cpus']} CPUs, "
        f"load average {load[0]:.1f} before and {info['load_average_after'][0]:.1f} after; medians of {args.reps} "
        "interleaved repetitions, ratios to batch 1 the medians of per-repetition ratios). Decode: every row decodes "
        f"{args.chunks} chunks of {DRAFT_CHUNK_TOKENS} tokens (no row leaves). Whole steps: every row writes {STEPS} "
        "steps in chunks of 8, leaving the batch at its delimiter, each call batching the rows with steps left. "
        "Batch 1 is a plain `generate_step`.",
        "",
        f"Target (a decode step at batch 16 at most 2x batch 1): {r16:.2f}x in process, "
        f"{'met' if r16 <= 2.0 else 'NOT met'}"
        + "".join(f"; {r['where']}: {r['rows']['16']['forward_vs_batch_1']:.2f}x" for r in results[1:])
        + ".",
        "",
    ]
    for result in results:
        lines += [*table(result), ""]
    text = "\n".join(lines)
    (args.out / "draft_batch.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
