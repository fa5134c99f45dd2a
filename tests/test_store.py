"""Trajectory store in the engine: cache as draft, trust, keys, TTL, LRU, faults, the log."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence

import anyio
import pytest
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.events import CacheHitEvent, Event
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.store import LogEntry, MemoryTrajectoryStore, Trajectory, image_digest
from dreamr_stream.types import StepSource

TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]
DRAFT = ["read row one", "read row 2 wrongly", "count them up", "Answer: 4"]
IMAGE = Image.new("RGB", (32, 32), (200, 10, 10))


def make(store: object | None = None, **cache: object) -> Reasoner:
    config = ReasonerConfig(cache=CacheConfig(**cache))  # type: ignore[arg-type]
    return Reasoner(
        ScriptedBackend(TARGET, name="target"),
        ScriptedBackend(DRAFT, name="draft"),
        config=config,
        store=store or MemoryTrajectoryStore(),  # type: ignore[arg-type]
    )


async def run(r: Reasoner, image: object = IMAGE, question: str = "how many?", **kw: object) -> list[Event]:
    return [e async for e in r.astream_events(image, question, **kw)]  # type: ignore[arg-type]


def result_of(events: list[Event]):  # type: ignore[no-untyped-def]
    assert events[-1].type == "finished"
    return events[-1].result  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_miss_then_hit_gives_the_same_steps_with_fewer_target_forwards() -> None:
    r = make()
    cold = await run(r)
    warm = await run(r)
    assert not any(isinstance(e, CacheHitEvent) for e in cold)
    hit = [e for e in warm if isinstance(e, CacheHitEvent)]
    assert hit and hit[0].steps == len(TARGET)
    cold_r, warm_r = result_of(cold), result_of(warm)
    assert [s.text for s in warm_r.steps] == [s.text for s in cold_r.steps] == TARGET
    assert all(s.source is StepSource.CACHE and s.verdict is not None for s in warm_r.steps)
    assert warm_r.stats.target_forwards < cold_r.stats.target_forwards
    assert warm_r.stats.draft_steps_judged == 0  # cached steps are not draft steps


@pytest.mark.asyncio
async def test_trust_cache_skips_verification() -> None:
    store = MemoryTrajectoryStore()
    await run(make(store))
    r = make(store, trust=True)
    warm = result_of(await run(r))
    assert [s.text for s in warm.steps] == TARGET
    assert all(s.source is StepSource.CACHE and s.verdict is None for s in warm.steps)


@pytest.mark.asyncio
async def test_key_uses_decoded_pixels_normalised_question_and_settings() -> None:
    store = MemoryTrajectoryStore()
    r = make(store)
    await run(r)
    png = io.BytesIO()
    IMAGE.save(png, format="PNG")
    bmp = io.BytesIO()
    IMAGE.save(bmp, format="BMP")
    assert image_digest(Image.open(io.BytesIO(png.getvalue()))) == image_digest(IMAGE)
    for image, question in ((png.getvalue(), "How   many?"), (bmp.getvalue(), " HOW MANY? ")):
        assert any(isinstance(e, CacheHitEvent) for e in await run(r, image, question))
    other = Image.new("RGB", (32, 32), (200, 10, 11))
    assert not any(isinstance(e, CacheHitEvent) for e in await run(r, other))
    strict = ReasonerConfig(verification=VerificationConfig(tau=2.0))
    assert not any(isinstance(e, CacheHitEvent) for e in await run(r, config=strict))


@pytest.mark.asyncio
async def test_memory_store_ttl_and_lru() -> None:
    store = MemoryTrajectoryStore(max_items=2, ttl_s=0.05)
    t = Trajectory(steps=["Answer: 1"], image="i", question="q")
    await store.put("a", t)
    assert await store.get("a") == t
    await anyio.sleep(0.06)
    assert await store.get("a") is None
    store.ttl_s = 60
    for k in ("a", "b", "c"):
        await store.put(k, t)
    assert await store.get("a") is None and await store.get("c") == t


class BrokenStore(MemoryTrajectoryStore):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    async def get(self, key: str):  # type: ignore[no-untyped-def]
        if self.mode == "raise":
            raise ConnectionError("store is down")
        if self.mode == "slow":
            await anyio.sleep(5)
        return {"steps": "not a list", "evil": True}  # a foreign value under our key

    async def put(self, key: str, trajectory: Trajectory, image_png: bytes | None = None) -> None:
        if self.mode == "raise":
            raise ConnectionError("store is down")
        if self.mode == "slow":
            await anyio.sleep(5)

    async def append_log(self, entries: Sequence[LogEntry]) -> None:
        if self.mode != "corrupt":
            raise ConnectionError("store is down")


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["raise", "slow", "corrupt"])
async def test_a_bad_store_never_breaks_or_stalls_a_stream(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    r = make(BrokenStore(mode), timeout_s=0.05)
    caplog.set_level(logging.WARNING, logger="dreamr_stream.store")
    t = time.perf_counter()
    for _ in range(2):
        events = await run(r)
        assert [s.text for s in result_of(events).steps] == TARGET
        assert not any(isinstance(e, CacheHitEvent) for e in events)
    assert time.perf_counter() - t < 2.0
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) <= 1 if mode != "corrupt" else not warnings


@pytest.mark.asyncio
async def test_every_verification_is_logged_with_the_target_step() -> None:
    store = MemoryTrajectoryStore()
    await run(make(store))
    entries = await store.read_log()
    assert [e.draft for e in entries] == DRAFT
    rejected = [e for e in entries if e.verdict is not None and not e.verdict.accepted]
    assert len(rejected) == 1 and rejected[0].target_step == TARGET[1] and rejected[0].prefix == TARGET[:1]
    assert all(e.question == "how many?" and e.image == image_digest(IMAGE) for e in entries)
    assert await store.get_image(entries[0].image) is not None  # the prompt image, for SAPO
    assert LogEntry.model_validate_json(entries[1].model_dump_json()) == entries[1]
