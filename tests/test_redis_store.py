"""RedisTrajectoryStore against a real Redis server that the tests start and stop themselves.

``redis_url`` is one server for the session (each test on its own prefix, as replicas share one
Redis); ``private_redis`` is a server of its own for the test that kills it. Both need the
``redis-server`` program (``scripts/test.sh`` installs Debian's package); nothing needs to listen on
6379.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
import pytest_asyncio
from dreamr_redis import RedisTrajectoryStore
from PIL import Image

from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig, ReasonerConfig
from dreamr_stream.events import CacheHitEvent
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.store import LogEntry, Trajectory
from dreamr_stream.types import StepSource

TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]
DRAFT = ["read row one", "read row 2 wrongly", "count them up", "Answer: 4"]
IMAGE = Image.new("RGB", (32, 32), (10, 10, 200))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    """A fresh ``redis-server`` on a free loopback port, once it accepts connections."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: apt-get install -y redis-server (or run scripts/test.sh)", pytrace=False)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    stop_redis(proc)
    pytest.fail(f"redis-server did not accept connections on port {port} within 5 s", pytrace=False)


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    proc, port = start_redis()
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(proc)


@pytest.fixture
def private_redis() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    proc, port = start_redis()
    yield proc, port
    stop_redis(proc)


@pytest_asyncio.fixture
async def store(redis_url: str) -> AsyncIterator[RedisTrajectoryStore]:
    s = RedisTrajectoryStore(redis_url, prefix=f"dreamr-test:{uuid.uuid4().hex[:8]}:", timeout_s=1.0)
    await s.client.ping()  # the server above answers: a failure here is a failure, not a skip
    yield s
    await s.clear()
    await s.aclose()


def reasoner(store: RedisTrajectoryStore, delay: float = 0.0) -> Reasoner:
    return Reasoner(
        ScriptedBackend(TARGET, name="target", token_delay_s=delay),
        ScriptedBackend(DRAFT, name="draft", token_delay_s=delay / 2),
        config=ReasonerConfig(cache=CacheConfig(timeout_s=0.3)),
        store=store,
    )


@pytest.mark.asyncio
async def test_round_trip_miss_and_ttl(store: RedisTrajectoryStore, redis_url: str) -> None:
    t = Trajectory(steps=["Row 1: empty.", "Answer: 0"], image="abc", question="q")
    assert await store.get("k") is None
    await store.put("k", t, b"\x89PNG...")
    assert await store.get("k") == t
    assert await store.get_image("abc") == b"\x89PNG..."
    short = RedisTrajectoryStore(redis_url, prefix=store.prefix, ttl_s=0.2)
    await short.put("brief", t)
    assert await short.get("brief") == t
    await anyio.sleep(0.35)
    assert await short.get("brief") is None
    await short.aclose()


@pytest.mark.asyncio
async def test_engine_hit_equals_miss(store: RedisTrajectoryStore) -> None:
    r = reasoner(store)
    cold = await r.ainvoke(IMAGE, "how many?")
    events = [e async for e in reasoner(store).astream_events(IMAGE, "how many?")]  # another replica
    assert any(isinstance(e, CacheHitEvent) for e in events)
    warm = events[-1].result  # type: ignore[union-attr]
    assert [s.text for s in warm.steps] == [s.text for s in cold.steps] == TARGET
    assert {s.source for s in warm.steps} == {StepSource.CACHE}
    assert warm.stats.target_forwards < cold.stats.target_forwards


@pytest.mark.asyncio
async def test_log_is_readable_and_bounded(store: RedisTrajectoryStore, redis_url: str) -> None:
    await reasoner(store).ainvoke(IMAGE, "how many?")
    entries = await store.read_log()
    assert [e.draft for e in entries] == DRAFT
    assert [e.target_step for e in entries if e.target_step] == [TARGET[1]]
    assert await store.get_image(entries[0].image) is not None
    small = RedisTrajectoryStore(redis_url, prefix=store.prefix + "small:", max_log=10)
    for _ in range(5):
        await small.append_log(entries * 40)
    assert len(await small.read_log(limit=10_000)) < 200  # approximate MAXLEN trims
    await small.clear()
    await small.aclose()


@pytest.mark.asyncio
async def test_foreign_and_corrupt_values_are_ignored(store: RedisTrajectoryStore) -> None:
    r = reasoner(store)
    await r.ainvoke(IMAGE, "how many?")
    keys = [k async for k in store.client.scan_iter(match=f"{store.prefix}traj:*")]
    assert len(keys) == 1
    await store.client.set(keys[0], b'{"steps": ["Answer: 999"], "evil": 1}')
    await store.client.xadd(f"{store.prefix}log", {"e": b"not json"})
    await store.client.xadd(f"{store.prefix}log", {"other": b"field"})
    result = await r.ainvoke(IMAGE, "how many?")
    assert [s.text for s in result.steps] == TARGET
    assert StepSource.CACHE not in {s.source for s in result.steps}
    assert all(isinstance(e, LogEntry) for e in await store.read_log())


@pytest.mark.asyncio
async def test_a_log_entry_that_does_not_parse_is_skipped_with_a_warning_and_the_rest_is_read(
    store: RedisTrajectoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    await reasoner(store).ainvoke(IMAGE, "how many?")
    good = await store.read_log()
    whole = good[0].model_dump_json().encode()
    await store.client.xadd(f"{store.prefix}log", {"e": whole[: len(whole) // 2] + b"\xc3"})  # torn mid-character
    await store.append_log(good[:1])
    with caplog.at_level(logging.WARNING, logger="dreamr_redis.store"):
        entries = await store.read_log()
    assert entries == [*good, good[0]]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 entries of the log {store.prefix}log that do not parse"
    ]


@pytest.mark.asyncio
async def test_redis_killed_mid_stream_still_finishes(
    private_redis: tuple[subprocess.Popen[bytes], int], caplog: pytest.LogCaptureFixture
) -> None:
    proc, port = private_redis
    store = RedisTrajectoryStore(f"redis://127.0.0.1:{port}/0", prefix="kill:", timeout_s=0.2)
    await reasoner(store).ainvoke(IMAGE, "warm up")  # the server works
    caplog.set_level(logging.WARNING)
    r = reasoner(store, delay=0.01)
    steps = []
    async for step in r.astream(IMAGE, "how many?"):
        steps.append(step)
        if len(steps) == 1:
            proc.kill()  # Redis dies mid-stream
            proc.wait()
    assert [s.text for s in steps] == TARGET
    again = await r.ainvoke(IMAGE, "how many?")  # still serving, without the cache
    assert [s.text for s in again.steps] == TARGET
    assert len([rec for rec in caplog.records if "unavailable" in rec.getMessage()]) == 1
    await store.aclose()


@pytest.mark.asyncio
async def test_redis_down_at_start() -> None:
    store = RedisTrajectoryStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.1)
    t = time.perf_counter()
    for _ in range(3):
        result = await reasoner(store).ainvoke(IMAGE, "how many?")
        assert [s.text for s in result.steps] == TARGET
    assert time.perf_counter() - t < 3
    await store.aclose()
