"""Labelled candidate steps scored by any target, in this process or served: what ``dreamr
calibrate`` chooses TBVM's tau on.

``zoo.tbvm_eval`` scores the same two sets with a model in this process, through blocking calls.
A served target is an async backend that the zoo's pipeline cannot drive, so the sets are made
again here through the engine's ``ModelRunner`` (which awaits a served model and runs a local
one in a worker thread), with the same items and labels:

* the judge set: after a correct prefix, the reference step or a corruption of it
  (``Task.judge_item`` on items ``10_000 + i`` of the split, as ``tbvm_eval.judge_set_scored``);
* the draft's steps: at every prefix of the target's own greedy trajectory, the draft's greedy
  step, right iff it is the target's own step there: the decision TBVM makes in FPSR, which is
  why the threshold is measured on them and not only on made-up corruptions.

Each candidate is scored once per TBVM mode the target supports. A model in this process returns
both kinds of evidence from one judge-suffixed score; a server answers the verdict tokens and the
candidate's log-probs in two requests (``backends.openai_compat``), so there it is scored twice.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dreamr_stream.backends.base import ScoreOutput
from dreamr_stream.config import GenerationConfig
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.tasks import Split, Task, TaskItem
from dreamr_stream.zoo.tbvm_eval import Labelled

__all__ = ["JUDGE_ITEM_OFFSET", "Scored", "draft_steps", "judge_set", "labelled", "target_steps"]

JUDGE_ITEM_OFFSET = 10_000  # judge items come from items 10_000 + i (tbvm_eval's), the drafts' from items i
Source = Literal["judge set", "draft"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Scored:
    """One labelled candidate and the target's score of it in each mode (``kind``: what is wrong
    with it, ``"none"`` when it is right; ``source``: which set it belongs to)."""

    kind: str
    source: Source
    scores: Mapping[str, ScoreOutput]


def labelled(items: Sequence[Scored], mode: str, source: Source | None = None) -> list[Labelled]:
    """The items (of one ``source``, or all) as ``tbvm_eval``'s labelled scores in ``mode``."""
    return [Labelled(x.kind, x.scores[mode]) for x in items if source is None or x.source == source]


async def _scores(
    target: ModelRunner, session: Any, text: str, modes: Sequence[str], stop: str
) -> dict[str, ScoreOutput]:
    """``text`` after ``session``'s prefix, scored in each mode on a fork (the session is kept).
    Judge mode first: a score that carries the candidate's log-probs too serves likelihood mode."""
    out: dict[str, ScoreOutput] = {}
    for mode in sorted(modes, key=lambda m: m != "judge"):
        judged = out.get("judge")
        if mode == "likelihood" and judged is not None and judged.token_logprobs:
            out[mode] = judged
            continue
        fork = await target.fork(session)
        try:
            judge = target.backend.judge if mode == "judge" else None
            out[mode] = await target.score(fork, text, stop=stop, judge=judge)
        finally:
            target.close(fork)
    return out


async def judge_set(
    target: ModelRunner,
    task: Task,
    *,
    n: int,
    modes: Sequence[str],
    split: Split = "val",
    seed: int = 0,
    gen: GenerationConfig | None = None,
) -> AsyncIterator[Scored]:
    """The judge set's ``n`` items (a reference step or a corruption, after a correct prefix),
    scored by the target in each mode."""
    stop = (gen or GenerationConfig()).step_delimiter
    rng = random.Random(seed)
    for i in range(n):
        item = task.judge_item(task.item(split, JUDGE_ITEM_OFFSET + i), rng)
        session = await target.open_session(item.item.image, item.item.question)
        try:
            for step in item.prefix:
                await target.append(session, step, stop=stop)
            scores = await _scores(target, session, item.candidate, modes, stop)
        finally:
            target.close(session)
        yield Scored(item.corruption, "judge set", scores)


async def target_steps(target: ModelRunner, item: TaskItem, gen: GenerationConfig) -> list[str]:
    """The target's own greedy steps on ``item``: the prefixes FPSR verifies drafts at."""
    session = await target.open_session(item.image, item.question)
    steps: list[str] = []
    try:
        while len(steps) < gen.max_steps:
            out = await target.generate_step(session, max_tokens=gen.max_step_tokens, stop=gen.step_delimiter)
            steps.append(out.text)
            if gen.is_final(out.text, out.eos):
                break
    finally:
        target.close(session)
    return steps


async def draft_steps(
    target: ModelRunner,
    draft: ModelRunner,
    task: Task,
    *,
    n: int,
    modes: Sequence[str],
    split: Split = "val",
    gen: GenerationConfig | None = None,
    progress: Progress | None = None,
) -> AsyncIterator[Scored]:
    """The draft's greedy step at every prefix of the target's trajectory on items ``0 .. n-1``,
    scored by the target in each mode; right iff it is the target's own step there."""
    gen = gen or GenerationConfig()
    stop = gen.step_delimiter
    for i in range(n):
        item = task.item(split, i)
        steps = await target_steps(target, item, gen)
        t_session = await target.open_session(item.image, item.question)
        d_session = await draft.open_session(item.image, item.question)
        try:
            for step in steps:
                fork = await draft.fork(d_session)
                try:
                    text = (await draft.generate_step(fork, max_tokens=gen.max_step_tokens, stop=stop)).text
                finally:
                    draft.close(fork)
                scores = await _scores(target, t_session, text, modes, stop)
                yield Scored("none" if text == step else "not the target's step", "draft", scores)
                await target.append(t_session, step, stop=stop)
                await draft.append(d_session, step, stop=stop)
        finally:
            target.close(t_session)
            draft.close(d_session)
        if progress is not None:
            progress(f"draft steps: {i + 1}/{n} items")
