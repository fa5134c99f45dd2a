"""SAPO's prompts on a task (the grid task's unless told): items of a split with the target's
greedy trajectories.

``demo_prompts`` is the ``PromptSource`` ``dreamr sapo train`` uses without a log: rollout groups
drawn from the train split (each trajectory computed on first draw and cached in the run
folder), validation on the val split. A trajectory's cache key is ``<split>:<index>`` (a run
folder holds one task's trajectories).
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
from dreamr_stream.tasks import DEFAULT_TASK, Split, TaskItem, TaskLike, as_task

__all__ = ["TaskPrompts", "demo_prompts", "task_prompt", "task_prompts"]


def _trajectory(target: TransformersBackend, item: TaskItem, gen: GenerationConfig) -> list[str]:
    """The target's greedy trajectory: the reference solution where one forward shows the
    target writes exactly that, else decoded step by step."""
    image, question, reference = item.image, item.question, list(item.steps)
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
    task: TaskLike = DEFAULT_TASK,
) -> RolloutPrompt:
    """Item ``i`` of a task split with the target's trajectory (from ``cache`` if there)."""
    item = as_task(task).item(split, i)
    key = f"{split}:{i}"
    steps = cache.get(key, partial(_trajectory, target, item, gen))
    return RolloutPrompt(item.image, item.question, steps, key=key)


def task_prompts(
    target: TransformersBackend,
    cache: TrajectoryCache,
    split: Split,
    n: int,
    start: int = 0,
    *,
    gen: GenerationConfig = DEFAULT_GENERATION,
    task: TaskLike = DEFAULT_TASK,
) -> list[RolloutPrompt]:
    """Items ``start .. start + n - 1`` of a task split with the target's trajectories."""
    chosen = as_task(task)
    return [task_prompt(target, cache, split, i, gen=gen, task=chosen) for i in range(start, start + n)]


class TaskPrompts(Sequence[RolloutPrompt]):
    """The first ``n`` items of a split as a sequence whose prompts are computed on first access:
    SAPO draws from thousands of items and needs the target's trajectory only of those drawn."""

    def __init__(
        self,
        target: TransformersBackend,
        cache: TrajectoryCache,
        split: Split,
        n: int,
        gen: GenerationConfig,
        task: TaskLike = DEFAULT_TASK,
    ) -> None:
        self.target, self.cache, self.split, self.n, self.gen = target, cache, split, n, gen
        self.task = as_task(task)
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
            self.items[i] = task_prompt(self.target, self.cache, self.split, i, gen=self.gen, task=self.task)
        return self.items[i]


def demo_prompts(
    pool: int, val: int, gen: GenerationConfig = DEFAULT_GENERATION, *, task: TaskLike = DEFAULT_TASK
) -> PromptSource:
    """A task's source: the first ``pool`` train items to draw from, the first ``val`` val items
    to validate on."""
    chosen = as_task(task)

    def source(target: TransformersBackend, cache: TrajectoryCache) -> SapoPrompts:
        return SapoPrompts(
            train=TaskPrompts(target, cache, "train", pool, gen, chosen),
            val=task_prompts(target, cache, "val", val, gen=gen, task=chosen),
        )

    return source
