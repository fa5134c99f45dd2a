"""The drafts' own steps on task items, labelled right or wrong: negatives for the target's judge.

The judge set's corruptions (``Task.judge_item``) are the mistakes we can think of; the drafts'
mistakes are the ones TBVM meets in FPSR. For an item and a step index ``k`` a draft writes step
``k`` after the reference steps before it (greedy, or sampled for more and other mistakes); the
step is right iff it is the reference step, the one step a correct solution writes there (the
task's solutions are deterministic, so any other text is a wrong step).

``dreamr zoo draft-steps --draft A --draft B -n 1500 --out runs/draft-steps.jsonl`` writes a
pool; a judge stage reads it through ``TrainConfig.draft_steps``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.jsonl import read_jsonl
from dreamr_stream.tasks import DEFAULT_TASK, JudgeItem, Split, Task, TaskItem, get_task
from dreamr_stream.zoo.data import STEP_DELIMITER
from dreamr_stream.zoo.task_needs import draw

__all__ = ["DraftStep", "read_pool", "sample_draft_steps", "write_pool"]


@dataclass(frozen=True)
class DraftStep:
    """A draft's step ``k`` of a task item, written after the reference steps before it."""

    split: Split
    index: int  # the item: ``task_needs.draw(task, split, index, hard=hard)``
    hard: bool
    k: int
    text: str
    correct: bool
    draft: str
    temperature: float
    task: str = DEFAULT_TASK  # pools written before tasks had names are the grid's

    def item(self) -> TaskItem:
        return draw(get_task(self.task), self.split, self.index, hard=self.hard)

    def judge_item(self) -> JudgeItem:
        """The step as a judge item: the reference prefix, this step as the candidate."""
        item = self.item()
        return JudgeItem(item, list(item.steps[: self.k]), self.text, "none" if self.correct else "draft")


@torch.no_grad()
def sample_draft_steps(
    draft: TransformersBackend,
    split: Split,
    indices: Sequence[int],
    *,
    temperatures: Sequence[float] = (0.0, 1.0),
    hard_fraction: float = 0.5,
    seed: int = 0,
    task: Task | None = None,
) -> list[DraftStep]:
    """One step per item of ``task`` (default: the grid) and temperature, at a step index drawn
    uniformly, through the backend's public calls (the way FPSR asks a draft for a step)."""
    task = get_task(DEFAULT_TASK) if task is None else task
    rng = random.Random(seed)
    out = []
    for index in indices:
        hard = rng.random() < hard_fraction
        item = draw(task, split, index, hard=hard)
        reference = item.steps
        k = rng.randrange(len(reference))
        for t in temperatures:
            session = draft.open_session(item.image, item.question, seed=rng.randrange(2**31))
            try:
                for step in reference[:k]:
                    draft.append(session, step, stop=STEP_DELIMITER)
                text = draft.generate_step(session, max_tokens=64, stop=STEP_DELIMITER, temperature=t).text
            finally:
                draft.close(session)
            out.append(DraftStep(split, index, hard, k, text, text == reference[k], draft.name, t, task.name))
    return out


def write_pool(steps: Sequence[DraftStep], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(s)) + "\n" for s in steps))


def read_pool(path: Path) -> list[DraftStep]:
    return [DraftStep(**rec) for rec in read_jsonl(path)]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Sample the drafts' steps on task items, labelled right or wrong.")
    parser.add_argument("--draft", type=Path, action="append", required=True, help="a draft folder (repeatable)")
    parser.add_argument(
        "--task", default=DEFAULT_TASK, help=f"the task whose items it samples (default: {DEFAULT_TASK})"
    )
    parser.add_argument("--split", default="train")
    parser.add_argument("-n", type=int, default=1000, help="items per draft")
    parser.add_argument("--start", type=int, default=500_000, help="first item index (away from other uses)")
    parser.add_argument("--temperature", type=float, action="append", help="default: 0 (greedy) and 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    temperatures = args.temperature or [0.0, 1.0]
    task = get_task(args.task)
    pool: list[DraftStep] = []
    for i, folder in enumerate(args.draft):
        draft = TransformersBackend.from_pretrained(folder, device="cpu", name=folder.name)
        indices = range(args.start + i * args.n, args.start + (i + 1) * args.n)
        steps = sample_draft_steps(draft, args.split, indices, temperatures=temperatures, seed=i, task=task)
        wrong = sum(not s.correct for s in steps)
        print(f"{folder.name}: {len(steps)} steps, {wrong} wrong ({wrong / max(1, len(steps)):.0%})")
        pool += steps
    write_pool(pool, args.out)


if __name__ == "__main__":
    main()
