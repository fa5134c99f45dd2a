"""``dreamr sapo train``: SAPO training of the draft, its prompts from the demo task or a Redis
trajectory log (the Redis adapter is composed here, in the application, never in the core)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dreamr_app.common import EXIT_FAILED, EXIT_OK

__all__ = ["train"]


def _prompts_from_log(args: argparse.Namespace) -> list[Any]:
    """The rollout prompts of a Redis trajectory log (``--from-log``), with their images."""
    import anyio
    from dreamr_redis import RedisTrajectoryStore

    from dreamr_stream.sapo.prompts import prompts_from_log

    async def load() -> list[Any]:
        store = RedisTrajectoryStore(args.from_log, prefix=args.prefix, timeout_s=5.0)
        entries = await store.read_log(limit=args.log_limit)
        images = {e.image: await store.get_image(e.image) for e in entries}
        await store.aclose()
        return prompts_from_log(entries, {k: v for k, v in images.items() if v})

    return anyio.run(load)


def train(args: argparse.Namespace) -> int:
    from dreamr_stream.backends.shipped import demo_paths
    from dreamr_stream.sapo.config import SapoConfig
    from dreamr_stream.sapo.prompts import held_out
    from dreamr_stream.sapo.trainer import train as sapo_train
    from dreamr_stream.zoo.prompts import demo_prompts

    cfg = SapoConfig.from_json(Path(args.config)) if args.config else SapoConfig()
    if args.steps is not None:
        cfg = cfg.model_copy(update={"steps": args.steps})
    paths = demo_paths("sft", args.task) if not (args.target and args.draft) else None
    target = Path(args.target) if args.target else paths.target  # type: ignore[union-attr]
    draft = Path(args.draft) if args.draft else paths.draft  # type: ignore[union-attr]
    source = demo_prompts(cfg.pool, cfg.eval_prompts, cfg.generation, task=args.task)
    if args.from_log:
        prompts = _prompts_from_log(args)
        if not prompts:
            print("no usable prompts in the trajectory log", file=sys.stderr)
            return EXIT_FAILED
        source = held_out(prompts, cfg.eval_prompts, cfg.seed)  # validated on puzzles of the log
    print(sapo_train(cfg, target, draft, Path(args.out), source))
    return EXIT_OK
