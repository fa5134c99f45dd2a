"""Calls running at once split the CPU's intra-op threads; a call alone keeps them all."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, SchedulingConfig
from dreamr_stream.engine.threads import ThreadShare
from dreamr_stream.reasoner import Reasoner

IMAGE = Image.new("RGB", (32, 32), (10, 200, 10))
STEPS = [f"a step of several words number {i}" for i in range(4)] + ["Answer: 4"]


class CpuFake(ScriptedBackend):
    """A scripted backend that says it runs on a CPU's threads and records what it is given."""

    cpu_threads = 2

    def __init__(self, *args: Any, log: list[tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def use_threads(self, n: int) -> None:
        self.log.append((threading.current_thread().name, n))


def make(log: list[tuple[str, int]], *, share: bool = True) -> Reasoner:
    config = ReasonerConfig(cache=CacheConfig(enabled=False), scheduling=SchedulingConfig(lookahead=2, fallback="off"))
    target = CpuFake(STEPS, name="target", token_delay_s=0.004, log=log)
    draft = CpuFake(STEPS, name="draft", token_delay_s=0.002, log=log)
    return Reasoner(target, draft, config=config, share_threads=share)


def test_share_arithmetic() -> None:
    share = ThreadShare(4, lambda n: None)
    assert share.claim() == 4 and share.claim() == 2 and share.claim() == 1
    share.release()
    share.release()
    assert share.claim() == 2
    with pytest.raises(ValueError):
        ThreadShare(0, lambda n: None)


@pytest.mark.asyncio
async def test_overlapping_lanes_split_the_threads_and_a_lone_lane_keeps_them() -> None:
    log: list[tuple[str, int]] = []
    r = make(log)
    await r.ainvoke(IMAGE, "q", method="fpsr")
    counts = {n for _, n in log}
    assert 1 in counts, "draft and verification overlap: each should have run on half the threads"
    assert counts <= {1, 2}
    assert all(name != threading.main_thread().name for name, _ in log), "set in the worker thread"
    log.clear()
    await r.ainvoke(IMAGE, "q", method="target_only")
    assert log and {n for _, n in log} == {2}, "a lane alone keeps every thread"
    assert r.target.threads is not None and r.target.threads.running == 0  # every claim released


def test_no_share_when_disabled_or_a_model_is_not_on_the_cpu() -> None:
    log: list[tuple[str, int]] = []
    assert make(log, share=False).target.threads is None
    plain = Reasoner(ScriptedBackend(STEPS), ScriptedBackend(STEPS))
    assert plain.target.threads is None  # fakes without cpu_threads: nothing to share


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
