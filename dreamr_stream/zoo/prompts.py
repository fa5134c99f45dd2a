"""SAPO's prompts on the demo task: puzzles of a split with the target's greedy trajectories.

``demo_prompts`` is the ``PromptSource`` ``dreamr sapo train`` uses without a log: rollout groups
drawn from the train split (each trajectory computed on first draw and cached in the run
folder), validation on the val split.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import overload

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.config import GenerationConfig
from dreamr_stream.sapo.config import DEFAULT_GENERATION
from dreamr_stream.sapo.prompts import PromptSource, SapoPrompts, TrajectoryCache
from dreamr_stream.sapo.rollouts import RolloutPrompt
from dreamr_stream.sapo.trajectories import greedy_writes, target_trajectory
from dreamr_stream.tasks.grid.puzzles import Puzzle, Split, make_puzzle, split_seed

__all__ = ["TaskPrompts", "demo_prompts", "task_prompt", "task_prompts"]


def _trajectory(target: TransformersBackend, puzzle: Puzzle, gen: GenerationConfig) -> list[str]:
    """The target's greedy trajectory: the reference solution where one forward shows the
    target writes exactly that, else decoded step by step."""
    image, question, reference = puzzle.image, puzzle.question.text(), puzzle.steps()
    if greedy_writes(target, image, question, reference, gen=gen):
        return reference
    return target_trajectory(target, image, question, gen=gen)


def task_prompt(
    target: TransformersBackend,
    cache: TrajectoryCache,
    split: Split,
    i: int,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> RolloutPrompt:
    """Puzzle ``i`` of a task split with the target's trajectory (from ``cache`` if there)."""
    puzzle = make_puzzle(split_seed(split, i), hard=split == "hard")
    key = f"{split}:{i}"
    steps = cache.get(key, partial(_trajectory, target, puzzle, gen))
    return RolloutPrompt(puzzle.image, puzzle.question.text(), steps, key=key)


def task_prompts(
    target: TransformersBackend,
    cache: TrajectoryCache,
    split: Split,
    n: int,
    start: int = 0,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
) -> list[RolloutPrompt]:
    """Puzzles ``start .. start + n - 1`` of a task split with the target's trajectories."""
    return [task_prompt(target, cache, split, i, gen=gen) for i in range(start, start + n)]


class TaskPrompts(Sequence[RolloutPrompt]):
    """The first ``n`` puzzles of a split as a sequence whose items are computed on first access:
    SAPO draws from thousands of puzzles and needs the target's trajectory only of those drawn."""

    def __init__(
        self, target: TransformersBackend, cache: TrajectoryCache, split: Split, n: int, gen: GenerationConfig
    ) -> None:
        self.target, self.cache, self.split, self.n, self.gen = target, cache, split, n, gen
        self.items: dict[int, RolloutPrompt] = {}

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> RolloutPrompt: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[RolloutPrompt]: ...
    def __getitem__(self, i: int | slice) -> RolloutPrompt | Sequence[RolloutPrompt]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i not in self.items:
            self.items[i] = task_prompt(self.target, self.cache, self.split, i, gen=self.gen)
        return self.items[i]


def demo_prompts(pool: int, val: int, gen: GenerationConfig = DEFAULT_GENERATION) -> PromptSource:
    """The demo task's source: the first ``pool`` train puzzles to draw from, the first ``val``
    val puzzles to validate on."""

    def source(target: TransformersBackend, cache: TrajectoryCache) -> SapoPrompts:
        return SapoPrompts(
            train=TaskPrompts(target, cache, "train", pool, gen), val=task_prompts(target, cache, "val", val, gen=gen)
        )

    return source
