"""Where SAPO's prompts come from: the caller hands ``train`` a ``PromptSource``, which gives the
prompts to draw rollout groups from and the held-out ones the draft is validated on.

A task supplies its own source (the demo task's is ``zoo.prompts.demo_prompts``); the trajectory
store's verification log is one here (``prompts_from_log``, then ``held_out``), so SAPO can
train on what a deployment verified and validate on puzzles of the same log it did not train on.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.errors import InvalidImageError
from dreamr_stream.inputs import load_image
from dreamr_stream.jsonl import open_append, read_jsonl
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.store import LogEntry

__all__ = ["PromptSource", "SapoPrompts", "TrajectoryCache", "held_out", "prompts_from_log"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SapoPrompts:
    """Rollout prompts to train on and held-out ones to validate on (disjoint puzzles).

    ``train`` may compute its items on first access (the demo task's target trajectories);
    ``val`` is read whole before the first update."""

    train: Sequence[RolloutPrompt]
    val: Sequence[RolloutPrompt]


# given the loaded target (whose greedy trajectories the prompts hold) and the run folder's cache
# of those trajectories, the run's prompts
PromptSource = Callable[[TransformersBackend, "TrajectoryCache"], SapoPrompts]


class TrajectoryCache:
    """Target trajectories per prompt key, persisted as JSON lines (resumable, computed once);
    in memory only when ``path`` is None."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.items: dict[str, list[str]] = {}
        if path is not None and path.exists():
            for rec in read_jsonl(path):
                self.items[rec["key"]] = rec["steps"]

    def get(self, key: str, compute: Callable[[], list[str]]) -> list[str]:
        if key not in self.items:
            self.items[key] = compute()
            if self.path is not None:
                with open_append(self.path) as f:
                    f.write(json.dumps({"key": key, "steps": self.items[key]}) + "\n")
        return self.items[key]


def prompts_from_log(entries: Iterable[LogEntry], images: dict[str, bytes]) -> list[RolloutPrompt]:
    """Rollout prompts from logged verifications: the prefix, then the target's step (the step
    the target wrote after a rejection, or the accepted draft). The images come from the store,
    which others may write, so they are decoded as a request's are; one that is not an image is
    skipped with a warning."""
    prompts = []
    for e in entries:
        target_step = e.target_step or (e.draft if e.verdict is not None and e.verdict.accepted else None)
        png = images.get(e.image)
        if target_step is None or png is None:
            continue
        try:
            image = load_image(png)
        except InvalidImageError as err:
            log.warning("the log's image %s is skipped: %s", e.image, err)
            continue
        prompts.append(RolloutPrompt(image, e.question, [*e.prefix, target_step], key=e.key, start=e.index))
    return prompts


def held_out(prompts: Sequence[RolloutPrompt], n_val: int, seed: int = 0) -> PromptSource:
    """A source splitting fixed prompts (a log's) into train and validation by puzzle (prompt
    key): whole puzzles, drawn at random, go to validation until it holds ``n_val`` prompts,
    and at least one puzzle is left to train on. Why by puzzle: a log holds several prefixes
    of each puzzle, and a prefix of a puzzle trained on is not held out."""
    by_key: dict[str, list[RolloutPrompt]] = {}
    for p in prompts:
        by_key.setdefault(p.key, []).append(p)
    keys = list(by_key)
    random.Random(seed).shuffle(keys)
    val: list[RolloutPrompt] = []
    while keys[1:] and len(val) < n_val:
        val += by_key[keys.pop()]
    kept = set(keys)
    train = [p for p in prompts if p.key in kept]  # in the log's order
    if n_val and not val:
        log.warning("the prompts hold one puzzle: nothing is held out to validate on")
    split = SapoPrompts(train=train, val=val)
    return lambda _target, _cache: split
