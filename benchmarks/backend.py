"""Backend micro-benchmark: our cached decode loop vs ``generate()``, and one-forward scoring.

    python benchmarks/backend.py [--tokens 32] [--repeats 7] [--threads 2]

On demo-shaped models (random weights; cost does not depend on them):
* ms/token of ``TransformersBackend.generate_step`` (hand-written cached loop) vs
  ``model.generate`` (greedy, same prompt, same number of new tokens);
* scoring a 20-token candidate in ONE forward vs 20 decode steps.
Methods are interleaved in every repeat; medians are reported (this CPU is noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlavaProcessor

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.tasks import get_task
from dreamr_stream.zoo.build import (
    DRAFT_SHAPE,
    JUDGE_SUFFIX,
    TARGET_SHAPE,
    build_model,
    build_processor,
    build_tokenizer,
)

NEVER = "\x00\x01never"


def bench(shape_name: str, processor: LlavaProcessor, tokens: int, repeats: int) -> dict[str, float]:
    shape = TARGET_SHAPE if shape_name == "target" else DRAFT_SHAPE
    model = build_model(processor.tokenizer, shape, seed=0).eval()
    backend = TransformersBackend(model, processor, name=shape_name, judge=JudgeTemplate(suffix=JUDGE_SUFFIX))
    backend.eos_ids = set()  # decode exactly `tokens` tokens
    item = get_task().item("train", 0)
    image, question = item.image, item.question
    inputs = backend.prompt_inputs(image, question)
    candidate = " red" * 20  # 20 tokens in the demo tokenizer
    n_cand = len(backend.encode(candidate))
    results: dict[str, list[float]] = {
        "loop_ms_per_token": [],
        "generate_ms_per_token": [],
        "score_one_forward_ms": [],
        "decode_same_tokens_ms": [],
    }
    for _ in range(repeats):
        s = backend.open_session(image, question)
        t = time.perf_counter()
        backend.generate_step(s, max_tokens=tokens, stop=NEVER)
        results["loop_ms_per_token"].append((time.perf_counter() - t) * 1000 / tokens)

        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            dt = time.perf_counter() - t
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        # generate() includes the prefill; subtract one measured prefill to compare decode only
        with torch.inference_mode():
            t = time.perf_counter()
            model(**inputs)
            prefill = time.perf_counter() - t
        results["generate_ms_per_token"].append((dt - prefill) * 1000 / tokens)

        s = backend.open_session(image, question)
        t = time.perf_counter()
        backend.score(s, candidate, stop=NEVER[:1], judge=backend.judge)
        results["score_one_forward_ms"].append((time.perf_counter() - t) * 1000)
        s = backend.open_session(image, question)
        t = time.perf_counter()
        backend.generate_step(s, max_tokens=n_cand, stop=NEVER)
        results["decode_same_tokens_ms"].append((time.perf_counter() - t) * 1000)
    med = {k: statistics.median(v) for k, v in results.items()}
    med["candidate_tokens"] = n_cand
    med["loop_speedup_vs_generate"] = med["generate_ms_per_token"] / med["loop_ms_per_token"]
    med["score_cost_in_decode_steps"] = med["score_one_forward_ms"] / med["loop_ms_per_token"]
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "backend.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    processor = build_processor(build_tokenizer())
    report: dict[str, object] = {
        "command": "python benchmarks/backend.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "models": f"random weights in the shipped demo shapes: target {TARGET_SHAPE}, draft {DRAFT_SHAPE}",
        "loadavg_before": os.getloadavg()[0],
    }
    report |= {name: bench(name, processor, args.tokens, args.repeats) for name in ("draft", "target")}
    report["target_over_draft_token_cost"] = (
        report["target"]["loop_ms_per_token"] / report["draft"]["loop_ms_per_token"]  # type: ignore[index]
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
