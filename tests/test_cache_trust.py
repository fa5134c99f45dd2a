"""A trajectory store is not trusted: a value under a request's key is used only when it is that
request's trajectory (its image digest and question) and no longer than the request could have
written. Poisoned values go in through the stores themselves: the in-memory one, and a real Redis
(``redis-server``, started per test with tests/test_redis_store.py's helpers)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from dreamr_redis import RedisTrajectoryStore
from PIL import Image
from test_redis_store import start_redis, stop_redis

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, GenerationConfig, ReasonerConfig
from dreamr_stream.events import CacheHitEvent
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.store import MemoryTrajectoryStore, Trajectory, TrajectoryStore

TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]
DRAFT = ["read row one", "read row 2 wrongly", "count them up", "Answer: 4"]
IMAGE = Image.new("RGB", (32, 32), (30, 160, 30))
QUESTION = "How many?"
POISON = "Answer: 999"


def poisons(digest: str) -> dict[str, Trajectory]:
    """What a writer to the store could put under the request's key, each meant to be reported
    as the verified answer."""
    return {
        "wrong question": Trajectory(steps=[POISON], image=digest, question="how many blue ones?"),
        "wrong image": Trajectory(steps=[POISON], image="0" * 32, question=QUESTION),
        "10,000 steps": Trajectory(steps=["look again"] * 9_999 + [POISON], image=digest, question=QUESTION),
        "a 1 MB step": Trajectory(steps=["x" * 2**20, POISON], image=digest, question=QUESTION),
    }


def reasoner(store: TrajectoryStore, trust: bool) -> Reasoner:
    config = ReasonerConfig(
        generation=GenerationConfig(max_steps=8, max_step_tokens=32), cache=CacheConfig(trust=trust, timeout_s=2.0)
    )
    return Reasoner(
        ScriptedBackend(TARGET, name="target"), ScriptedBackend(DRAFT, name="draft"), config=config, store=store
    )


async def check_poisons_miss(store: TrajectoryStore, trust: bool, caplog: pytest.LogCaptureFixture) -> None:
    r = reasoner(store, trust)
    cold = await r.ainvoke(IMAGE, QUESTION)
    assert [s.text for s in cold.steps] == TARGET
    [first, *_] = await store.read_log()  # the request's key and image digest
    honest = await store.get(first.key)
    assert honest is not None and honest.steps == TARGET
    caplog.set_level(logging.WARNING, logger="dreamr_stream.engine.cache")
    for name, poison in poisons(first.image).items():
        await store.put(first.key, poison)
        caplog.clear()
        events = [e async for e in r.astream_events(IMAGE, QUESTION)]
        result = events[-1].result  # type: ignore[union-attr]
        assert [s.text for s in result.steps] == [s.text for s in cold.steps], name
        assert not any(isinstance(e, CacheHitEvent) for e in events), name
        assert len([rec for rec in caplog.records if "is ignored" in rec.getMessage()]) == 1, name
    # the honest trajectory, put back, hits again: the checks refuse only what is not the request's
    await store.put(first.key, honest)
    events = [e async for e in r.astream_events(IMAGE, " how MANY? ")]
    assert any(isinstance(e, CacheHitEvent) for e in events)
    r.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("trust", [True, False])
async def test_poisoned_memory_store_values_are_misses(trust: bool, caplog: pytest.LogCaptureFixture) -> None:
    await check_poisons_miss(MemoryTrajectoryStore(), trust, caplog)


@pytest_asyncio.fixture
async def redis_store() -> AsyncIterator[RedisTrajectoryStore]:
    """A real Redis server of the test's own, through the project's store."""
    proc, port = start_redis()
    store = RedisTrajectoryStore(f"redis://127.0.0.1:{port}/0", prefix="dreamr-trust:", timeout_s=2.0)
    try:
        await store.client.ping()  # the server answers: a failure here is a failure, not a skip
        yield store
    finally:
        await store.aclose()
        stop_redis(proc)


@pytest.mark.asyncio
@pytest.mark.parametrize("trust", [True, False])
async def test_poisoned_redis_values_are_misses(
    redis_store: RedisTrajectoryStore, trust: bool, caplog: pytest.LogCaptureFixture
) -> None:
    await check_poisons_miss(redis_store, trust, caplog)


def test_sapo_decodes_the_logs_images_as_requests_are(caplog: pytest.LogCaptureFixture) -> None:
    """The log's images come from the store too: one in a format a request may not send is skipped."""
    import io

    from dreamr_stream.sapo.prompts import prompts_from_log
    from dreamr_stream.store import LogEntry
    from dreamr_stream.types import Verdict

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        IMAGE.save(buf, format=fmt)
        return buf.getvalue()

    accepted = Verdict(p_pos=0.9, p_neg=0.1, ratio=9.0, tau=1.0, accepted=True)
    entries = [
        LogEntry(key=f"k{i}", image=digest, question=QUESTION, index=0, prefix=[], draft="Answer: 4", verdict=accepted)
        for i, digest in enumerate(("png", "tga"))
    ]
    caplog.set_level(logging.WARNING, logger="dreamr_stream.sapo.prompts")
    prompts = prompts_from_log(entries, {"png": encoded("PNG"), "tga": encoded("TGA")})
    assert [p.key for p in prompts] == ["k0"] and prompts[0].image.tobytes() == IMAGE.tobytes()
    assert len([r for r in caplog.records if "tga is skipped" in r.getMessage()]) == 1
