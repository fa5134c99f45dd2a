"""With a draft on the same CPU each model's calls take half its intra-op threads; a target
alone keeps them all; each call's worker thread sets its own."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, SchedulingConfig
from dreamr_stream.engine.threads import split_threads
from dreamr_stream.reasoner import Reasoner

IMAGE = Image.new("RGB", (32, 32), (10, 200, 10))
STEPS = [f"a step of several words number {i}" for i in range(4)] + ["Answer: 4"]


class CpuFake(ScriptedBackend):
    """A scripted backend that says it runs on a CPU's threads and records what it is given."""

    def __init__(self, *args: Any, log: list[tuple[str, str, int]], threads: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log
        self.cpu_threads = threads

    def use_threads(self, n: int) -> None:
        self.log.append((self.name, threading.current_thread().name, n))


def make(log: list[tuple[str, str, int]], *, split: bool = True, draft: bool = True) -> Reasoner:
    config = ReasonerConfig(cache=CacheConfig(enabled=False), scheduling=SchedulingConfig(lookahead=2, fallback="off"))
    target = CpuFake(STEPS, name="target", token_delay_s=0.002, log=log)
    d = CpuFake(STEPS, name="draft", token_delay_s=0.001, log=log) if draft else None
    return Reasoner(target, d, config=config, split_threads=split)


def test_split_arithmetic() -> None:
    log: list[tuple[str, str, int]] = []
    t = CpuFake(STEPS, log=log, threads=4)
    assert split_threads(t, CpuFake(STEPS, log=log, threads=4)) == (2, 2)
    assert split_threads(t, CpuFake(STEPS, log=log, threads=1)) == (1, 1)  # the smaller count, shared
    assert split_threads(t, None) == (4, None)  # alone: all of them
    assert split_threads(t, ScriptedBackend(STEPS)) == (4, None)  # the draft is not on this CPU
    assert split_threads(ScriptedBackend(STEPS), None) == (None, None)
    assert split_threads(CpuFake(STEPS, log=log, threads=0), t) == (None, 4)  # threads 0: on a GPU


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["fpsr", "sequential", "target_only"])
async def test_every_call_runs_on_its_models_share_set_in_its_worker_thread(method: str) -> None:
    log: list[tuple[str, str, int]] = []
    r = make(log)
    await r.ainvoke(IMAGE, "q", method=method)  # type: ignore[arg-type]
    assert log and {n for _, _, n in log} == {2}
    assert {name for name, _, _ in log} == ({"target"} if method == "target_only" else {"target", "draft"})
    assert all(thread != threading.main_thread().name for _, thread, _ in log), "set in the worker thread"


@pytest.mark.asyncio
async def test_a_target_alone_keeps_every_thread_and_no_split_leaves_them_alone() -> None:
    log: list[tuple[str, str, int]] = []
    await make(log, draft=False).ainvoke(IMAGE, "q", method="target_only")
    assert log and {n for _, _, n in log} == {4}
    log.clear()
    await make(log, split=False).ainvoke(IMAGE, "q", method="fpsr")
    assert log == []


def test_a_worker_threads_setting_leaves_other_threads_alone(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    target, _ = tiny_pair
    before = torch.get_num_threads()
    seen: list[int] = []

    def work() -> None:
        target.use_threads(1)
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [1] and torch.get_num_threads() == before
    assert target.cpu_threads == before  # the tiny models run on the CPU
