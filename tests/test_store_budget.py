"""The memory store is bounded in bytes as well as entries, and keeps images as the models read them.

An upload can be megapixels of noise: stored as it came, each finished request added tens of
megabytes to the default store. Through ``engine.cache`` (what a finished request does) and
through the store itself.
"""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import ReasonerConfig
from dreamr_stream.engine.cache import open_cache
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.store import (
    STORED_IMAGE_BYTES,
    STORED_IMAGE_SIDE,
    GuardedStore,
    MemoryTrajectoryStore,
    Trajectory,
    image_png,
    storable_image,
)
from dreamr_stream.tasks import DEFAULT_TASK, as_task

pytestmark = pytest.mark.asyncio


def noise(n: int, side: int = 2000) -> list[Image.Image]:
    """``n`` distinct images that no encoder can shrink: the worst case for a stored PNG."""
    row = side * 3
    pixels = os.urandom(row * (side + n))
    return [Image.frombytes("RGB", (side, side), pixels[i * row : (i + side) * row]) for i in range(n)]


async def finish(store: MemoryTrajectoryStore, image: Image.Image, question: str = "how many?") -> str:
    """What a finished request does with the store: keep its trajectory and its image."""
    runners = (
        ModelRunner(ScriptedBackend(["Answer: 1"], name="target"), "target"),
        ModelRunner(ScriptedBackend(["Answer: 1"], name="draft"), "draft"),
    )
    cache = await open_cache(ReasonerConfig(), GuardedStore(store, timeout_s=5.0), *runners, image, question)
    assert cache is not None
    await cache.store_trajectory(["Answer: 1"])
    return cache.image


async def test_large_distinct_uploads_stay_within_the_byte_budget() -> None:
    assert MemoryTrajectoryStore().max_bytes == 64 * 2**20  # the default; a smaller one here, to fill it
    budget = 8 * 2**20
    store = MemoryTrajectoryStore(max_bytes=budget)
    digests = [await finish(store, image) for image in noise(50)]
    assert store.nbytes <= budget
    kept = [png for d in digests if (png := await store.get_image(d)) is not None]
    assert 5 <= len(kept) < 50  # the newest ones, as many as fit
    assert await store.get_image(digests[-1]) is not None and await store.get_image(digests[0]) is None
    assert sum(len(png) for png in kept) <= budget
    for png in kept:
        assert max(Image.open(io.BytesIO(png)).size) == STORED_IMAGE_SIDE  # scaled down, aspect kept


async def test_a_demo_puzzle_is_stored_as_it_is() -> None:
    puzzle = as_task(DEFAULT_TASK).item("test", 0).image
    store = MemoryTrajectoryStore()
    digest = await finish(store, puzzle)
    stored = await store.get_image(digest)
    assert stored == image_png(puzzle)  # byte for byte what the request ran on
    assert Image.open(io.BytesIO(stored)).tobytes() == puzzle.convert("RGB").tobytes()


async def test_eviction_is_least_recently_used_across_kinds_and_by_bytes() -> None:
    png = b"x" * 1000

    def t(i: int) -> Trajectory:
        return Trajectory(steps=["Answer: 1"], image=f"img{i}", question="q", created_s=0.0)

    store = MemoryTrajectoryStore()
    await store.put("k", t(0), png)
    store = MemoryTrajectoryStore(max_bytes=3 * store.nbytes)  # three trajectories with their images
    for i in range(3):
        await store.put(f"k{i}", t(i), png)
    assert await store.get_image("img0") is not None  # used: now the most recent image
    await store.put("k3", t(3), png)  # over the budget: the least recently used go first
    assert await store.get("k0") is None and await store.get_image("img1") is None
    assert await store.get_image("img0") == png and await store.get_image("img3") == png
    assert store.nbytes <= store.max_bytes


async def test_every_store_refuses_an_image_over_the_cap() -> None:
    assert storable_image(b"x" * STORED_IMAGE_BYTES) is not None
    assert storable_image(b"x" * (STORED_IMAGE_BYTES + 1)) is None
    store = MemoryTrajectoryStore()
    await store.put("k", Trajectory(steps=["Answer: 1"], image="big", question="q"), b"x" * (STORED_IMAGE_BYTES + 1))
    assert await store.get("k") is not None and await store.get_image("big") is None
