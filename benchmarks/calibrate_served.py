"""A served target's verification settings: none, the target folder's, or measured by ``dreamr
calibrate`` against the server. Does calibrating a served model win back what the defaults lose?

    python benchmarks/calibrate_served.py [--url http://127.0.0.1:8000/v1] [-n 16] [--puzzles 8]
                                          [--out benchmarks/results/calibrate_served]

Without ``--url`` it starts the shipped demo target on a local vLLM server (one shared server, as
a user starts it). Then it calibrates TBVM for that server with the shipped SAPO draft on ``-n``
val items (``zoo.calibrate``, what ``dreamr calibrate --target-url`` runs), and runs FPSR over the
server three ways against vLLM alone at one request in flight, on ``--puzzles`` test items
(``dreamr_vllm.bench``, methods interleaved, no trajectory cache): with no settings (the
library's defaults, which warn), with the shipped target folder's ``dreamr.json``, and with the
calibrated one. One draft process serves all three.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from dreamr_vllm import VLLMBackend
from dreamr_vllm.bench import run_levels

from dreamr_stream.backends import registry
from dreamr_stream.backends.settings import read_settings
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import ReasonerConfig, VerificationConfig
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.zoo.calibrate import calibrate, write_settings


def _variant(url: str, draft: Any, settings: Path | None) -> Reasoner:
    """FPSR over ``url`` with the verification ``settings`` recommends (None: the defaults)."""
    target = VLLMBackend.connect(url, name="target", settings_from=settings)
    rec = read_settings(settings).verification if settings is not None else {}
    config = ReasonerConfig(verification=VerificationConfig.recommended(rec)) if rec else None
    return Reasoner(target, draft, config=config)


async def _bench(url: str, draft: Any, settings: Path | None, puzzles: int) -> dict[str, Any]:
    fpsr = _variant(url, draft, settings)
    alone = Reasoner(VLLMBackend.connect(url, name="target", settings_from=demo_paths().target))
    try:
        config = fpsr.config.override(cache=False)
        rows = await run_levels(
            {"target_only": alone, "fpsr": fpsr}, config, puzzles=puzzles, concurrency=[1], rounds=1
        )
        return {"verification": config.verification.model_dump(mode="json"), **rows[0]}
    finally:
        fpsr.close()
        alone.close()


def _table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| FPSR's verification settings | mode, tau | vLLM alone req/s | FPSR req/s | throughput ratio "
        "| median latency ratio | accuracy (alone / FPSR) | acceptance | repaired steps per request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        v, t, f = r["verification"], r["target_only"], r["fpsr"]
        lines.append(
            f"| {name} | {v['mode']}, {v['tau']:.4g} | {t['requests_per_s']:.2f} | {f['requests_per_s']:.2f} | "
            f"**{r['throughput_ratio']:.2f}x** | {r['median_latency_ratio']:.2f}x | "
            f"{t['accuracy']:.0%} / {f['accuracy']:.0%} | {r['acceptance']:.0%} | "
            f"{r['repaired_steps_per_request']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running vLLM server of the shipped target (default: start one)")
    parser.add_argument("--venv", default=os.environ.get("DREAMR_VLLM_VENV", ".venv-vllm"))
    parser.add_argument("-n", type=int, default=16, help="val items to calibrate on")
    parser.add_argument("--puzzles", type=int, default=8, help="test puzzles to time each way on")
    parser.add_argument("--out", default="benchmarks/results/calibrate_served")
    args = parser.parse_args()
    shipped = demo_paths()
    server = None
    if args.url is None:
        from dreamr_vllm.server import VLLMServer, ensure_venv

        server = VLLMServer(ensure_venv(args.venv), shipped.target, name="target").start()
        args.url = server.url
    try:
        t0 = time.perf_counter()
        measured = calibrate(args.url, draft=shipped.draft, n=args.n, progress=print)
        calibrate_s = time.perf_counter() - t0
        folder = write_settings(measured, Path(tempfile.mkdtemp()) / "settings")
        print(json.dumps(measured.record()["chosen"]), f"in {calibrate_s:.0f} s", flush=True)
        draft = registry.open(shipped.draft, name="draft", device="cpu", process=True)
        try:
            variants = {"none (defaults)": None, "shipped target folder": shipped.target, "dreamr calibrate": folder}
            rows = {}
            for name, settings in variants.items():
                rows[name] = anyio.run(_bench, args.url, draft, settings, args.puzzles)
                print(name, json.dumps(rows[name]), flush=True)
        finally:
            registry.shutdown(draft)
    finally:
        if server is not None:
            server.stop()
    record = measured.record()
    meta = {
        "command": "python benchmarks/calibrate_served.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "calibrate_s": round(calibrate_s, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "calibration": record, "bench": rows}, indent=2) + "\n"
    )
    figures = "\n".join(
        f"| {m} | {r['tau']:.4g} | {r['overall']['recall']:.3f} | {r['overall']['false_accept']:.3f} | "
        f"{r['overall']['agreement']:.3f} | {r['draft_acceptance']:.3f} |"
        for m, r in record["modes"].items()
    )
    md = (
        f"# Calibrating a served target\n\n`{meta['command']}` ({meta['when']}, {meta['machine']}); "
        f"calibration took {meta['calibrate_s']} s on {record['judge_items']} judge items and "
        f"{record['draft_items']} draft steps (val split); chosen: {record['chosen']}.\n\n"
        "| mode | tau | right accepted | wrong accepted | agreement | draft steps accepted |\n"
        "|---|---|---|---|---|---|\n"
        f"{figures}\n\nFPSR over the same server against vLLM alone, one request in flight, "
        f"{args.puzzles} test puzzles:\n\n{_table(rows)}\n"
    )
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
