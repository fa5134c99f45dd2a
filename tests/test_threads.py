"""With a draft on the same CPU each model's calls take half its intra-op threads; a target
alone keeps them all; each call's worker thread sets its own."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from PIL import Image

from dreamr_stream.backends.base import Capabilities
from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.backends.registry import capabilities_of
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
        self.threads = threads

    @property
    def capabilities(self) -> Capabilities:
        return super().capabilities.but(cpu_threads=self.threads, sets_threads=True)

    def use_threads(self, n: int) -> None:
        self.log.append((self.name, threading.current_thread().name, n))


def make(log: list[tuple[str, str, int]], *, split: bool = True, draft: bool = True) -> Reasoner:
    config = ReasonerConfig(cache=CacheConfig(enabled=False), scheduling=SchedulingConfig(lookahead=2, fallback="off"))
    target = CpuFake(STEPS, name="target", token_delay_s=0.002, log=log)
    d = CpuFake(STEPS, name="draft", token_delay_s=0.001, log=log) if draft else None
    return Reasoner(target, d, config=config, split_threads=split)


def test_split_arithmetic() -> None:
    log: list[tuple[str, str, int]] = []

    def cpu(threads: int) -> Capabilities:
        return capabilities_of(CpuFake(STEPS, log=log, threads=threads))

    t, elsewhere = cpu(4), capabilities_of(ScriptedBackend(STEPS))
    assert split_threads(t, cpu(4)) == (2, 2)
    assert split_threads(t, cpu(1)) == (1, 1)  # the smaller count, shared
    assert split_threads(t, None) == (4, None)  # alone: all of them
    assert split_threads(t, elsewhere) == (4, None)  # the draft is not on this CPU
    assert split_threads(elsewhere, None) == (None, None)
    assert split_threads(cpu(0), t) == (None, 4)  # threads 0: on a GPU
    # a server on loopback computes on these cores: the draft takes its share, the server's
    # own threads are its business (it sets none)
    served = Capabilities(identity="served", device="remote", concurrent=True, cpu_threads=4)
    assert split_threads(served, cpu(4)) == (2, 2)


@pytest.mark.asyncio
async def test_only_a_backend_that_sets_threads_is_given_a_count() -> None:
    log: list[tuple[str, str, int]] = []
    config = ReasonerConfig(cache=CacheConfig(enabled=False), scheduling=SchedulingConfig(lookahead=2, fallback="off"))
    r = Reasoner(ScriptedBackend(STEPS, name="target"), CpuFake(STEPS, name="draft", log=log), config=config)
    assert (r.target.threads, r.draft.threads if r.draft else None) == (None, 4)
    await r.ainvoke(IMAGE, "q")
    assert {name for name, _, _ in log} == {"draft"}


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
