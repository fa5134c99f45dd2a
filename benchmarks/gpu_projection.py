"""FPSR over a served target against the target alone, projected from per-component costs.

    python benchmarks/gpu_projection.py [--load benchmarks/results/vllm_load.json]
        [--draft benchmarks/results/draft_batch.json] [--out benchmarks/results/gpu_projection.md]

A request of N tokens in S steps, with C requests in flight on one server:

* the target alone decodes N tokens, one engine step each: latency ``N * t(C)``, where ``t(C)``
  is the server's time per decode step with C sequences in its batch;
* FPSR, per step of k = N / S tokens: the draft writes it (k batched draft steps at ``d(C)``
  each), the server verifies it in one engine step that also prefills the step's k tokens
  (``t(C) + k * p``), and a rejected step (1 - acceptance) is repaired: the target writes the
  part the draft got wrong (a share ``r`` of the step) at ``t(C)`` a token. With lookahead the
  draft of the next step overlaps this step's verification, so a step costs
  ``max(k * d(C), t(C) + k * p) + (1 - a) * r * k * t(C)``, plus one HTTP round trip ``h`` per
  server request.

The throughput ratio at C in flight is the latency ratio (closed loop: C clients, each sending
its next request when the last is answered), as long as the server keeps up, which a GPU's
memory-bound decode does at these batch sizes. On this 2-core CPU it does not: the server is
compute-bound from a few requests in flight, so requests/s is capped by the CPU seconds each
request costs the server (and the draft, on the same cores). That cap is the column "CPU:
capacity bound": vLLM alone's server CPU per request over FPSR's, from the same run's ``/proc``
counters (the draft's CPU on the same cores comes on top). It is what the measured ratios
follow: each verification is an HTTP request that vLLM's API server parses, templates,
tokenizes and matches to its multimodal cache (the image is sent again), 50-80 ms of CPU here,
on the same 2 cores that decode.

Two columns of inputs:

* **this CPU (measured)**: ``t(C)`` from vLLM alone's requests/s in ``--load`` (t = C / (rps * N)),
  N, S, the acceptance and the repaired share from the same run, ``d(C)`` from ``--draft``
  (batched draft steps through the draft's process), ``p`` and ``h`` from the server's own
  counters. The model ignores that the draft and the server share 2 cores, so it is an upper
  bound here; the measured ratios beside it show how far contention takes them down;
* **a GPU (assumed, not measured: no GPU was lent to this project)**: ``t(C) = t1 + s * (C - 1)``
  with ``t1`` 7 ms and ``s`` 0.05 ms per extra sequence (a 7B VLM target decoding in bf16 on an
  H100, memory-bound at these batch sizes), a small draft at 2.5 ms per batched step on the same
  GPU, prefill at 0.02 ms per token, 1 ms per HTTP request; every one a flag, to be replaced by
  figures measured on the GPU (``benchmarks/gpu.sh``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Costs:
    """The per-component costs one projection uses (milliseconds)."""

    tokens: float  # N per request
    steps: float  # S per request
    acceptance: float
    repaired_share: float  # r: of a rejected step, the share the target writes
    prefill_ms_per_token: float  # p
    http_ms: float  # h per server request
    step_ms: dict[int, float]  # t(C)
    draft_ms: dict[int, float]  # d(C)


def _interpolate(table: dict[int, float], c: int) -> float:
    """``table`` at ``c`` (linear between the batch sizes measured, flat beyond them)."""
    keys = sorted(table)
    if c <= keys[0]:
        return table[keys[0]]
    for lo, hi in itertools.pairwise(keys):
        if c <= hi:
            return table[lo] + (table[hi] - table[lo]) * (c - lo) / (hi - lo)
    return table[keys[-1]]


def project(costs: Costs, c: int) -> dict[str, float]:
    """Latencies (s) of the target alone and of FPSR at ``c`` in flight, and their ratio."""
    t, d = _interpolate(costs.step_ms, c), _interpolate(costs.draft_ms, c)
    k = costs.tokens / costs.steps
    alone = costs.tokens * t + costs.http_ms
    per_step = max(k * d, t + k * costs.prefill_ms_per_token) + costs.http_ms
    per_step += (1 - costs.acceptance) * (costs.repaired_share * k * t + costs.http_ms)
    fpsr = costs.steps * per_step
    return {"alone_s": alone / 1000, "fpsr_s": fpsr / 1000, "ratio": alone / fpsr}


def measured(load: dict[str, Any], draft: dict[str, Any]) -> tuple[Costs, dict[int, float]]:
    """The CPU's costs from a ``vllm_load.py`` run and a ``draft_batch.py`` run, and the ratios
    that run measured (FPSR speculating at every load only where its run did)."""
    rows = load["levels"]
    base = "plain" if "plain" in rows[0] else "target_only"
    first = rows[0]["where_time_goes"]
    n = first[base]["server_generated_tokens"]
    fpsr = first["fpsr"]
    steps = rows[0]["target_only"].get("steps_per_request") or 7.0  # the demo task's solutions: 7 steps
    prefill = fpsr["server_prefill_s"] * 1000 / max(1.0, fpsr["server_prompt_tokens"])
    http = 1.0  # loopback: a request's own round trip is small beside the server's work
    step_ms = {r["concurrency"]: 1000 * r["concurrency"] / (r[base]["requests_per_s"] * n) for r in rows}
    by_batch = {int(b): v for b, v in _draft_steps(draft).items()}
    costs = Costs(
        tokens=n,
        steps=steps,
        acceptance=rows[0]["acceptance"] or 0.8,
        repaired_share=0.5,
        prefill_ms_per_token=prefill,
        http_ms=http,
        step_ms=step_ms,
        draft_ms=by_batch,
    )
    return costs, {r["concurrency"]: r["throughput_ratio"] for r in rows}


def capacity_bounds(load: dict[str, Any]) -> dict[int, float]:
    """Per load: vLLM alone's server CPU seconds per request over FPSR's (the draft's own CPU,
    on the same cores, comes on top: the bound is loose by that much)."""
    out: dict[int, float] = {}
    for r in load["levels"]:
        costs = r.get("where_time_goes", {})
        base = costs.get("plain") or costs.get("target_only") or {}
        fpsr = costs.get("fpsr") or {}
        if base.get("server_cpu_s") and fpsr.get("server_cpu_s"):
            out[r["concurrency"]] = base["server_cpu_s"] / fpsr["server_cpu_s"]
    return out


def _draft_steps(draft: dict[str, Any]) -> dict[str, float]:
    """ms per batched draft forward by batch size, through the draft's process where measured."""
    runs = {r["where"]: r["rows"] for r in draft["results"]}
    rows = next((v for k, v in runs.items() if k.startswith("ProcessBackend")), None) or runs["in process"]
    return {b: float(v["forward_ms"]) for b, v in rows.items()}


def gpu(args: argparse.Namespace, like: Costs) -> Costs:
    loads = [1, 2, 4, 8, 16, 32]
    return Costs(
        tokens=like.tokens,
        steps=like.steps,
        acceptance=like.acceptance,
        repaired_share=like.repaired_share,
        prefill_ms_per_token=args.gpu_prefill_ms,
        http_ms=args.gpu_http_ms,
        step_ms={c: args.gpu_step_ms + args.gpu_step_slope_ms * (c - 1) for c in loads},
        draft_ms={c: args.gpu_draft_ms for c in loads},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, default=ROOT / "results" / "vllm_load.json")
    parser.add_argument("--draft", type=Path, default=ROOT / "results" / "draft_batch.json")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_projection.md")
    parser.add_argument("--gpu-step-ms", type=float, default=7.0, help="assumed: a decode step at 1 in flight")
    parser.add_argument("--gpu-step-slope-ms", type=float, default=0.05, help="assumed: per extra sequence")
    parser.add_argument("--gpu-draft-ms", type=float, default=2.5, help="assumed: a batched draft step")
    parser.add_argument("--gpu-prefill-ms", type=float, default=0.02, help="assumed: per prefilled token")
    parser.add_argument("--gpu-http-ms", type=float, default=1.0, help="assumed: per server request")
    args = parser.parse_args()
    load, draft = json.loads(args.load.read_text()), json.loads(args.draft.read_text())
    cpu, seen = measured(load, draft)
    bound = capacity_bounds(load)
    on_gpu = gpu(args, cpu)
    lines = [
        "# FPSR over a served target: projected from per-component costs",
        "",
        f"`python benchmarks/gpu_projection.py --load {args.load.name} --draft {args.draft.name}`: the model in "
        "`benchmarks/gpu_projection.py`'s docstring. Inputs: N = "
        f"{cpu.tokens:.0f} tokens in S = {cpu.steps:.1f} steps, acceptance {cpu.acceptance:.0%}, a rejected step's "
        f"repaired share {cpu.repaired_share:.0%}; this CPU's prefill {cpu.prefill_ms_per_token:.2f} ms/token; the GPU "
        f"column's costs are assumptions (decode step {args.gpu_step_ms:g} ms + {args.gpu_step_slope_ms:g} ms per "
        f"extra sequence, draft step {args.gpu_draft_ms:g} ms, prefill {args.gpu_prefill_ms:g} ms/token, "
        f"{args.gpu_http_ms:g} ms per request), not measurements.",
        "",
        "| requests in flight | CPU: decode step t(C) ms | CPU: draft step d(C) ms | CPU: latency model "
        "| CPU: capacity bound | CPU: measured ratio | GPU: decode step ms | GPU: latency model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(cpu.step_ms):
        mine, theirs = project(cpu, c), project(on_gpu, c)
        t, d, g = _interpolate(cpu.step_ms, c), _interpolate(cpu.draft_ms, c), _interpolate(on_gpu.step_ms, c)
        lines.append(
            f"| {c} | {t:.1f} | {d:.2f} | {mine['ratio']:.2f}x | {bound.get(c, float('nan')):.2f}x "
            f"| {seen.get(c, float('nan')):.2f}x | {g:.2f} | {theirs['ratio']:.2f}x |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
