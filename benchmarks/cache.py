"""Warm vs cold trajectory cache on the demo models: time to full answer and target forwards.

    python benchmarks/cache.py [--n 10] [--redis redis://127.0.0.1:6379/0]

For each test puzzle: a cold request (fresh key), then the same question on the same image
(warm: cached steps verified by TBVM, one target forward each), then warm with trust_cache
(no verification). Requests are interleaved per puzzle; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from datetime import date
from pathlib import Path

import anyio
from PIL import Image

from dreamr_stream import Reasoner
from dreamr_stream.config import CacheConfig
from dreamr_stream.store import MemoryTrajectoryStore
from dreamr_stream.tasks import get_task


async def run(n: int, redis_url: str | None) -> dict[str, object]:
    load_before = os.getloadavg()[0]  # other processes on the machine skew the times
    if redis_url:
        from dreamr_redis import RedisTrajectoryStore

        store: object = RedisTrajectoryStore(redis_url, prefix=f"dreamr-bench:{uuid.uuid4().hex[:8]}:", timeout_s=1.0)
    else:
        store = MemoryTrajectoryStore()
    base = Reasoner.demo()
    reasoner = Reasoner(base.target.backend, base.draft.backend, config=base.config, store=store)  # type: ignore[union-attr, arg-type]
    trust = base.config.model_copy(update={"cache": CacheConfig(trust=True)})
    rows: dict[str, list[tuple[float, int, bool]]] = {"cold": [], "warm": [], "warm_trusted": []}
    await reasoner.ainvoke(*_puzzle(10_000)[:2])  # warm-up
    for i in range(n):
        image, question, answer = _puzzle(i)
        for name, config in (("cold", None), ("warm", None), ("warm_trusted", trust)):
            r = await reasoner.ainvoke(image, question, config=config)
            rows[name].append((r.stats.wall_s, r.stats.target_forwards, r.answer == str(answer)))
    if redis_url:
        await store.clear()  # type: ignore[attr-defined]
        await store.aclose()  # type: ignore[attr-defined]
    report: dict[str, object] = {
        "command": "python benchmarks/cache.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "models": "shipped demo target and SAPO draft (Reasoner.demo())",
        "loadavg_before": load_before,
        "n": n,
        "store": "redis" if redis_url else "memory",
    }
    for name, vals in rows.items():
        report[name] = {
            "median_wall_s": statistics.median(v[0] for v in vals),
            "median_target_forwards": statistics.median(v[1] for v in vals),
            "accuracy": sum(v[2] for v in vals) / len(vals),
        }
    cold = report["cold"]["median_wall_s"]  # type: ignore[index]
    report["speedup_warm"] = cold / report["warm"]["median_wall_s"]  # type: ignore[index]
    report["speedup_warm_trusted"] = cold / report["warm_trusted"]["median_wall_s"]  # type: ignore[index]
    return report


def _puzzle(i: int) -> tuple[Image.Image, str, int]:
    item = get_task().item("test", i)
    return item.image, item.question, item.answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--redis", default=None, help="a Redis URL; default: the in-memory store")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = anyio.run(run, args.n, args.redis)
    text = json.dumps(report, indent=2)
    print(text)
    out = args.json or Path(__file__).parent / "results" / f"cache_{report['store']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
