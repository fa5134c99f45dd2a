"""FPSR over vLLM against vLLM serving the target alone: single requests and concurrent load.

    python benchmarks/vllm_load.py [--puzzles 16] [--concurrency 1,4,16] [--rounds 2]
                                   [--url http://127.0.0.1:8000/v1] [--venv .venv-vllm]
                                   [--out benchmarks/results/vllm_load]

Without ``--url`` it starts the shipped demo target on a local vLLM server (``dreamr_vllm.server``,
its venv built once). Both methods use that one server with its default threads, which is what
a user who runs vLLM alone would have; FPSR's draft (the shipped SAPO draft) computes in its own
process on one intra-op thread. What is measured and reported: ``dreamr_vllm.bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from dreamr_vllm.bench import PlainClient, plot, run_levels, to_markdown

from dreamr_stream.backends.process import ProcessBackend
from dreamr_stream.backends.settings import read_settings
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import CacheConfig
from dreamr_stream.reasoner import Reasoner


def _start(args: argparse.Namespace, cpus: list[int] | None, log: str | None) -> Any:
    from dreamr_vllm.server import VLLMServer, ensure_venv

    folder = args.settings or demo_paths().target  # a settings folder of a model folder: serve the model
    server = VLLMServer(ensure_venv(args.venv), folder, name="target", cpus=cpus, log_path=log)
    t0 = time.perf_counter()
    server.start()
    print(f"vLLM server (cpus {cpus or 'vLLM default'}) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return server


async def _main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    servers = []
    try:
        if args.url is None:
            servers.append(await anyio.to_thread.run_sync(_start, args, None, args.server_log))
            args.url = servers[-1].url
        if args.fpsr_url is None and args.server_cpus:
            servers.append(await anyio.to_thread.run_sync(_start, args, args.server_cpus, args.server_log))
            args.fpsr_url = servers[-1].url
        settings = args.settings or demo_paths().target
        draft = demo_paths().draft
        fpsr = Reasoner.from_pretrained(target=args.fpsr_url or args.url, draft=draft, settings_from=settings)
        if args.draft_cpus and isinstance(fpsr.draft.backend if fpsr.draft else None, ProcessBackend):
            fpsr.draft.backend.pin(set(args.draft_cpus))  # type: ignore[union-attr]
            if args.draft_nice:
                os.setpriority(os.PRIO_PROCESS, fpsr.draft.backend.pid, args.draft_nice)  # type: ignore[union-attr]
        alone = Reasoner.from_pretrained(target=args.url, settings_from=settings) if args.fpsr_url else fpsr
        reasoners: dict[str, Reasoner] = {"target_only": alone, "fpsr": fpsr}
        # every request does its full model work: no trajectory cache (puzzles repeat across rounds)
        scheduling = fpsr.config.scheduling.model_copy(
            update={"max_speculating": args.max_speculating, "fallback": args.fallback}
        )
        config = fpsr.config.model_copy(update={"cache": CacheConfig(enabled=False), "scheduling": scheduling})
        if args.mode is not None:  # the folder's tau for that mode
            taus = read_settings(settings).verification.get("taus") or {}
            if args.mode not in taus:
                raise SystemExit(f"--mode {args.mode}: {settings}/dreamr.json measured no tau for it ({taus})")
            config = config.override(mode=args.mode, tau=float(taus[args.mode]))
        plain = PlainClient(args.url)
        try:
            rows = await run_levels(
                reasoners,
                config,
                puzzles=args.puzzles,
                concurrency=args.concurrency,
                rounds=args.rounds,
                seed0=args.seed0,
                report=lambda row: print(json.dumps(row), flush=True),
                plain=plain,
                server_url=args.url if args.fpsr_url is None else None,
                server_pid=_server_pid(args, servers),
            )
        finally:
            await plain.aclose()
    finally:
        for server in servers:
            server.stop()
    meta = {
        "command": "python benchmarks/vllm_load.py " + " ".join(args.argv),
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "puzzles": args.puzzles,
        "rounds": args.rounds,
        "max_speculating": args.max_speculating,
        "fallback": args.fallback,
        "verification": config.verification.model_dump(mode="json"),
        "setup": _setup(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "levels": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(rows, meta))
    plot(rows, out.with_suffix(".png"), title=f"FPSR over vLLM vs vLLM alone ({meta['machine']})")
    print(to_markdown(rows, meta))


def _server_pid(args: argparse.Namespace, servers: list[Any]) -> int | None:
    """The shared server's process here (started by us, or found by its port), for its CPU time."""
    from dreamr_vllm.metrics import find_server_pid

    if args.fpsr_url is not None:
        return None  # two servers: no one process is the shared server's
    if servers and servers[0].process is not None:
        return int(servers[0].process.pid)
    port = httpx.URL(args.url).port
    return find_server_pid(port) if port else None


def _setup(args: argparse.Namespace) -> str:
    alone = "vLLM alone: plain chat completions to a server with vLLM's default thread binding"
    if args.fpsr_url is None:
        return f"{alone}; FPSR over the same server, its draft in its own process, one thread, unpinned."
    where = f"cores {args.server_cpus}" if args.server_cpus else f"{args.fpsr_url}, pinned to one core"
    draft = f"pinned to cores {args.draft_cpus}" if args.draft_cpus else "unpinned"
    return f"{alone}; FPSR over a second server ({where}), its draft in its own process, one thread, {draft}."


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puzzles", type=int, default=16)
    parser.add_argument("--seed0", type=int, default=0, help="first test-split puzzle (dreamr bench's are 0..n-1)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fallback", choices=["auto", "on", "off"], default="auto", help="FPSR's target lane")
    parser.add_argument("--url", default=None, help="a running server for vLLM alone (default: start one)")
    parser.add_argument("--fpsr-url", default=None, help="FPSR's server (default: the same, or one on --server-cpus)")
    parser.add_argument("--server-cpus", type=_ints, default=None, help="start FPSR's server pinned to these cores")
    parser.add_argument("--draft-cpus", type=_ints, default=None, help="pin FPSR's draft process to these cores")
    parser.add_argument("--draft-nice", type=int, default=0, help="scheduling priority of FPSR's draft process")
    parser.add_argument(
        "--max-speculating", type=lambda s: None if s == "none" else s if s == "auto" else int(s), default="auto"
    )
    parser.add_argument(
        "--settings", default=None, help="the target's folder: its dreamr.json for FPSR (default: the shipped target)"
    )
    parser.add_argument(
        "--mode", choices=["judge", "likelihood"], default=None, help="TBVM mode (default: the folder's)"
    )
    parser.add_argument("--venv", default=".venv-vllm", help="where the server's venv is (built once)")
    parser.add_argument("--server-log", default=None)
    parser.add_argument("--out", default="benchmarks/results/vllm_load")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    anyio.run(_main, args)


if __name__ == "__main__":
    main()
