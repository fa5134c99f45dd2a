"""The trajectory cache as one request sees it (``engine.cache``): its key, its lookups and
stores, its log. End to end through the Reasoner: tests/test_store.py."""

from __future__ import annotations

import anyio
import pytest
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.engine.cache import CacheContext, open_cache
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.store import GuardedStore, LogEntry, MemoryTrajectoryStore
from dreamr_stream.types import StepSource, Verdict

IMAGE = Image.new("RGB", (16, 16), (1, 2, 3))
CONFIG = ReasonerConfig(verification=VerificationConfig(mode="likelihood", tau=0.25))


def runners() -> tuple[ModelRunner, ModelRunner]:
    return (
        ModelRunner(ScriptedBackend(["a", "Answer: 1"], name="target"), "target"),
        ModelRunner(ScriptedBackend(["a"], name="draft"), "draft"),
    )


async def opened(config: ReasonerConfig = CONFIG, store: MemoryTrajectoryStore | None = None) -> CacheContext:
    guard = GuardedStore(store or MemoryTrajectoryStore())
    cache = await open_cache(config, guard, *runners(), IMAGE, "How many  RED shapes?")
    assert cache is not None
    return cache


def verdict(accepted: bool) -> Verdict:
    p_pos = 0.9 if accepted else 0.1
    return Verdict(p_pos=p_pos, p_neg=0.1, ratio=p_pos / 0.1, tau=2.0, accepted=accepted)


@pytest.mark.asyncio
async def test_the_key_is_the_one_stores_already_hold() -> None:
    """Trajectories cached by earlier versions (a shared Redis) keep hitting: the key of fixed
    models, settings, image and question is this string."""
    cache = await opened()
    assert cache.key == "f65998b7bd769a34:328cc1b840595720507fd9acb1584bdf:229c3396e42b345a"
    assert cache.image == "328cc1b840595720507fd9acb1584bdf"
    other = await opened(CONFIG.override(tau=0.5))
    assert other.key.split(":")[1:] == cache.key.split(":")[1:] and other.key != cache.key


@pytest.mark.asyncio
async def test_no_cache_when_caching_is_off() -> None:
    off = CONFIG.override(cache=False)
    assert await open_cache(off, GuardedStore(MemoryTrajectoryStore()), *runners(), IMAGE, "q") is None


@pytest.mark.asyncio
async def test_a_stored_trajectory_is_looked_up_with_its_image() -> None:
    store = MemoryTrajectoryStore()
    cache = await opened(store=store)
    assert await cache.lookup() is None and cache.steps == []
    await cache.store_trajectory(["a", "Answer: 1"])
    again = await opened(store=store)
    assert await again.lookup() == ["a", "Answer: 1"] == again.steps
    assert await store.get_image(cache.image) is not None  # the prompt image, for SAPO


@pytest.mark.asyncio
async def test_the_log_keeps_verdicts_and_the_target_step_that_replaced_a_rejection() -> None:
    store = MemoryTrajectoryStore()
    cache = await opened(store=store)
    cache.log_verdict(verdict(True), index=0, prefix=[], text="a", source=StepSource.CACHE)
    cache.log_verdict(verdict(False), index=1, prefix=["a"], text="b", source=StepSource.DRAFT)
    cache.log_target_step(0, "not this one")  # only the last entry, and only its own step
    cache.log_target_step(1, "Answer: 1")
    await cache.flush_log()
    assert cache.entries == []
    entries = await store.read_log()
    assert [(e.index, e.draft, e.source, e.target_step) for e in entries] == [
        (0, "a", "cache", None),
        (1, "b", "draft", "Answer: 1"),
    ]
    assert all(isinstance(e, LogEntry) and e.key == cache.key and e.image == cache.image for e in entries)


@pytest.mark.asyncio
async def test_a_request_that_does_not_log_logs_nothing() -> None:
    cache = await opened(CONFIG.model_copy(update={"cache": CacheConfig(log=False)}))
    cache.log_verdict(verdict(True), index=0, prefix=[], text="a", source=StepSource.DRAFT)
    assert cache.entries == []


@pytest.mark.asyncio
async def test_a_cancelled_request_still_flushes_its_log() -> None:
    store = MemoryTrajectoryStore()
    cache = await opened(store=store)
    cache.log_verdict(verdict(True), index=0, prefix=[], text="a", source=StepSource.DRAFT)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await cache.flush_log()
    assert [e.draft for e in await store.read_log()] == ["a"]
