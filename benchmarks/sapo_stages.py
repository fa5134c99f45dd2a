"""SAPO recipes compared by stages: train (resuming the same run folder), and after each stage
count the prefixes of the target's trajectories on N validation puzzles where the draft's greedy
step is exactly the target's step.

    python benchmarks/sapo_stages.py CONFIG.json --out runs/x --stages 10,20,40,80 [--val 300]

Exact greedy steps stand in for TBVM acceptance (likelihood mode accepts a step when every
token is likely under the target; on these models the two agree to within half a point) because
they cost one teacher-forced forward per puzzle (``trajectories.greedy_matches``), so a stage is
judged in seconds and every recipe on the same 300 puzzles and 1,679 prefixes. The closing
figures on the test split come from ``dreamr zoo eval --prefixes``. Each stage's draft is kept
in ``<out>/u<update>``; one JSON line per stage goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.shipped import WEIGHTS
from dreamr_stream.jsonl import read_jsonl
from dreamr_stream.sapo.config import SapoConfig
from dreamr_stream.sapo.draft import TransformersDraft
from dreamr_stream.sapo.prompts import TrajectoryCache
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.sapo.trainer import train
from dreamr_stream.sapo.trajectories import greedy_matches
from dreamr_stream.zoo.prompts import demo_prompts, task_prompts


def exact_share(draft_dir: Path, prompts: list[RolloutPrompt]) -> tuple[float, int]:
    """Share of the prompts' prefixes where the draft's greedy step is the target's, and how many."""
    draft = TransformersDraft(TransformersBackend.from_pretrained(draft_dir, device="cpu", name="draft"))
    hits = total = 0
    for p in prompts:
        matches = greedy_matches(draft, p.image, p.question, p.steps)
        hits, total = hits + sum(matches), total + len(matches)
    return hits / max(1, total), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", required=True, help="comma-separated update counts, increasing")
    parser.add_argument("--val", type=int, default=300, help="validation puzzles judged after each stage")
    parser.add_argument("--target", type=Path, default=WEIGHTS / "target")
    parser.add_argument("--draft", type=Path, default=WEIGHTS / "draft-sft", help="the draft SAPO starts from")
    args = parser.parse_args()
    cfg = SapoConfig.from_json(args.config)
    torch.set_num_threads(cfg.threads)
    target = TransformersBackend.from_pretrained(args.target, device="cpu", name="target")
    args.out.mkdir(parents=True, exist_ok=True)
    val = task_prompts(target, TrajectoryCache(args.out / "val_trajectories.jsonl"), "val", args.val)
    share, judged = exact_share(args.draft, val)
    print(json.dumps({"update": 0, "exact": round(100 * share, 2), "prefixes": judged}), flush=True)
    for stage in (int(s) for s in args.stages.split(",")):
        cfg = cfg.model_copy(update={"steps": stage})
        snapshot = args.out / f"u{stage}"
        final = train(cfg, args.target, args.draft, args.out, demo_prompts(cfg.pool, cfg.eval_prompts, cfg.generation))
        shutil.copytree(final, snapshot, dirs_exist_ok=True)
        share, judged = exact_share(snapshot, val)
        rows = read_jsonl(args.out / "log.jsonl")
        last = [r for r in rows if "reward" in r][-1]
        minutes = sum(r["s"] for r in rows if "reward" in r) / 60
        print(
            json.dumps(
                {
                    "update": stage,
                    "exact": round(100 * share, 2),
                    "prefixes": judged,
                    "kl": round(last["kl"], 4),
                    "minutes": round(minutes, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
