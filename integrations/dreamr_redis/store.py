"""RedisTrajectoryStore: ``redis.asyncio``, one key prefix, TTL on whole keys, pipelines.

Layout under ``prefix``:

* ``traj:<key>``   JSON of a ``Trajectory`` (SET with PX: Redis 7.0 has no per-field TTL);
* ``img:<digest>`` the prompt image as PNG, same TTL (SAPO rebuilds prompts from the log);
* ``log``          a stream of ``LogEntry`` JSON (XADD with an approximate MAXLEN).

Values are validated on the way out: anything foreign or corrupt under our keys is ignored.
After a connection failure the store stays quiet for a backoff interval (doubling up to
``max_backoff_s``) and raises ``ConnectionError`` at once meanwhile, so a dead Redis costs no
time; the core's ``GuardedStore`` turns every failure into a cache miss and logs it once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import ValidationError
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from dreamr_stream.store import STORED_IMAGE_BYTES, LogEntry, Trajectory, storable_image

__all__ = ["RedisTrajectoryStore"]

log = logging.getLogger(__name__)


class RedisTrajectoryStore:
    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "dreamr:",
        ttl_s: float = 3600.0,
        max_log: int = 100_000,
        max_image_bytes: int = STORED_IMAGE_BYTES,
        timeout_s: float = 0.2,
        max_backoff_s: float = 30.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        if ttl_s <= 0 or max_log <= 0:
            raise ValueError("ttl_s and max_log must be positive")
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.max_log = max_log
        self.max_image_bytes = max_image_bytes
        self.max_backoff_s = max_backoff_s
        self._url = url
        self._options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry_on_timeout": False,
        }
        self._given = client
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._backoff_s = 0.0
        self._retry_at = 0.0

    @property
    def client(self) -> aioredis.Redis:
        """The client of the running event loop (a ``client`` passed in is used as it is).

        redis.asyncio connections belong to the loop that opened them, and one store serves
        several loops: a Reasoner runs its requests on a loop of its own, while its caller may read
        the store (or clear it) from theirs.
        """
        if self._given is not None:
            return self._given
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = aioredis.Redis.from_url(self._url, **self._options)
        return client

    # ------------------------------------------------------------------ keys and health
    def _k(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}{':' + name if name else ''}"

    def _check(self) -> None:
        if time.monotonic() < self._retry_at:
            raise ConnectionError(f"redis unavailable; retrying in {self._retry_at - time.monotonic():.1f}s")

    def _failed(self, e: BaseException) -> NoReturn:
        self._backoff_s = min(self.max_backoff_s, max(0.5, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s
        raise ConnectionError(f"redis error: {e}") from e

    def _ok(self) -> None:
        self._backoff_s = 0.0
        self._retry_at = 0.0

    # ------------------------------------------------------------------ store protocol
    async def get(self, key: str) -> Trajectory | None:
        self._check()
        try:
            raw = await self.client.get(self._k("traj", key))
        except (RedisError, OSError) as e:
            self._failed(e)
        self._ok()
        if raw is None:
            return None
        try:
            return Trajectory.model_validate_json(raw)
        except (ValidationError, ValueError):
            log.debug("ignoring a foreign or corrupt value under %s", self._k("traj", key))
            return None

    async def put(self, key: str, trajectory: Trajectory, image_png: bytes | None = None) -> None:
        self._check()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self._k("traj", key), trajectory.model_dump_json(), px=self.ttl_ms)
                image_png = storable_image(image_png, self.max_image_bytes)
                if image_png is not None:
                    pipe.set(self._k("img", trajectory.image), image_png, px=self.ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self._failed(e)
        self._ok()

    async def append_log(self, entries: Sequence[LogEntry]) -> None:
        if not entries:
            return
        self._check()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.xadd(self._k("log"), {"e": entry.model_dump_json()}, maxlen=self.max_log, approximate=True)
                await pipe.execute()
        except (RedisError, OSError) as e:
            self._failed(e)
        self._ok()

    async def read_log(self, limit: int = 1000) -> list[LogEntry]:
        """The newest ``limit`` entries, oldest first; an entry that does not parse (foreign, or
        torn) is skipped, with one warning per read that counts them: one bad entry must not
        cost SAPO the whole log."""
        self._check()
        try:
            rows = await self.client.xrevrange(self._k("log"), count=limit)
        except (RedisError, OSError) as e:
            self._failed(e)
        self._ok()
        entries, skipped = [], 0
        for _id, fields in reversed(list(rows or [])):
            try:
                entries.append(LogEntry.model_validate_json((fields or {})[b"e"]))
            except (KeyError, TypeError, ValidationError, ValueError):
                skipped += 1
        if skipped:
            log.warning("skipped %d entries of the log %s that do not parse", skipped, self._k("log"))
        return entries

    async def get_image(self, digest: str) -> bytes | None:
        self._check()
        try:
            raw = await self.client.get(self._k("img", digest))
        except (RedisError, OSError) as e:
            self._failed(e)
        self._ok()
        return raw if isinstance(raw, bytes) else None

    async def clear(self) -> int:
        """Delete every key under this store's prefix; returns how many."""
        n = 0
        async for key in self.client.scan_iter(match=f"{self.prefix}*", count=500):
            n += await self.client.delete(key)
        return n

    async def aclose(self) -> None:
        """Close the running loop's client (a client another loop opened goes with that loop)."""
        client = self._given if self._given is not None else self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
