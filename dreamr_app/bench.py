"""``dreamr bench``: every method side by side on the models in this process (``local``), or FPSR
over a served target against that target alone (``served``, through the vLLM adapter)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dreamr_app.common import EXIT_OK, EXIT_USAGE, adapter, load_reasoner

__all__ = ["local", "served"]


def served(args: argparse.Namespace) -> int:
    """``dreamr bench --target-url``: FPSR over the served target against it alone."""
    import anyio

    bench = adapter("dreamr_vllm.bench", what="--target-url", extra="vllm")
    if bench is None:
        return EXIT_USAGE
    reasoner = load_reasoner(args)
    # every request does its full model work: no trajectory cache (the rounds repeat puzzles)
    config = reasoner.config.override(tau=args.tau, cache=False)
    concurrency = [int(c) for c in args.concurrency.split(",")]

    async def levels() -> list[dict[str, object]]:
        plain = bench.PlainClient(args.target_url)  # the server asked as its users ask it: the baseline
        try:
            return await bench.run_levels(  # type: ignore[no-any-return]
                {"target_only": reasoner, "fpsr": reasoner},
                config,
                puzzles=args.n,
                concurrency=concurrency,
                rounds=args.rounds,
                task=args.task,
                plain=plain,
            )
        finally:
            await plain.aclose()

    rows = anyio.run(levels)
    meta = {"command": "dreamr bench " + " ".join(sys.argv[2:]), "when": time.strftime("%Y-%m-%d")}
    meta |= {"machine": f"{os.cpu_count()} cores", "puzzles": args.n, "rounds": args.rounds}
    table = bench.to_markdown(rows, meta)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_served.md").write_text(table)
        (Path(args.out) / "bench_served.json").write_text(json.dumps({"meta": meta, "levels": rows}, indent=2))
    print(table)
    return EXIT_OK


def local(args: argparse.Namespace) -> int:
    """``dreamr bench``: every method (or ``--methods``) on local model folders, the shipped demo by default."""
    import torch
    from rich.progress import Progress

    from dreamr_stream.backends.shipped import demo_paths, shipped_drafts
    from dreamr_stream.bench import ALL_METHODS, run_bench, save, to_markdown
    from dreamr_stream.tasks import DEFAULT_TASK

    if args.threads:
        torch.set_num_threads(args.threads)
    # the task's shipped models where no folder is given
    paths = demo_paths("sft", args.task)
    sapo = (
        Path(args.sapo)
        if args.sapo
        else (demo_paths("sapo", args.task).draft if "sapo" in shipped_drafts(args.task) else None)
    )
    methods = tuple(args.methods.split(",")) if args.methods else ALL_METHODS
    with Progress() as bar:
        task = bar.add_task("bench", total=args.n)
        result = run_bench(
            target_dir=Path(args.target) if args.target else paths.target,
            sft_dir=Path(args.draft) if args.draft else paths.draft,
            sapo_dir=sapo,
            n=args.n,
            methods=methods,
            device=args.device,
            tau=args.tau,
            task=args.task,
            progress=lambda i, n: bar.update(task, completed=i),
        )
    # the default task's files keep their names (bench_cpu.*); another task's carry its name
    tag = args.tag or (args.device if args.task == DEFAULT_TASK else f"{args.device}_{args.task}")
    save(result, Path(args.out), tag)
    print(to_markdown(result))
    return EXIT_OK
