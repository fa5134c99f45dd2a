"""Trajectory store: verified trajectories as free drafts, and a verification log for SAPO.

* ``TrajectoryStore`` is the protocol; ``MemoryTrajectoryStore`` (bounded LRU with TTL) is the
  embedded default; ``dreamr_redis.RedisTrajectoryStore`` shares one cache between replicas.
* Keys: a fingerprint of (target, draft, verifier settings, tau), a hash of the DECODED image
  pixels (so the same picture in PNG or JPEG-re-encoded-losslessly, or as base64, hits), and the
  normalised question.
* The engine never trusts a store: values are validated, and any store error or slow call
  (``GuardedStore``) is a cache miss with one warning, never a broken stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import anyio
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamr_stream.types import Verdict

__all__ = [
    "GuardedStore",
    "LogEntry",
    "MemoryTrajectoryStore",
    "Trajectory",
    "TrajectoryStore",
    "image_digest",
    "image_png",
    "normalise_question",
    "settings_fingerprint",
    "trajectory_key",
]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


class Trajectory(BaseModel):
    """A complete verified trajectory (its last step is final)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    v: int = SCHEMA_VERSION
    steps: list[str] = Field(min_length=1)
    image: str = Field(description="image digest, for the log and SAPO")
    question: str
    created_s: float = Field(default_factory=time.time)


class LogEntry(BaseModel):
    """One verification: the draft step, its verdict, and the target's step where it wrote one."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")
    v: int = SCHEMA_VERSION
    key: str
    image: str
    question: str
    index: int = Field(ge=0)
    prefix: list[str] = Field(description="verified steps before this one")
    draft: str
    verdict: Verdict | None = None
    target_step: str | None = None
    source: str = "draft"  # "draft" or "cache"
    time_s: float = Field(default_factory=time.time)


def normalise_question(question: str) -> str:
    return " ".join(question.lower().split())


def image_digest(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels and size: independent of the file encoding."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()[:32]


def image_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def settings_fingerprint(target: str, draft: str, verifier: dict[str, object]) -> str:
    blob = json.dumps({"target": target, "draft": draft, "verifier": verifier}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trajectory_key(fingerprint: str, image: str, question: str) -> str:
    q = hashlib.sha256(normalise_question(question).encode()).hexdigest()[:16]
    return f"{fingerprint}:{image}:{q}"


@runtime_checkable
class TrajectoryStore(Protocol):
    async def get(self, key: str) -> Trajectory | None: ...

    async def put(self, key: str, trajectory: Trajectory, image_png: bytes | None = None) -> None: ...

    async def append_log(self, entries: Sequence[LogEntry]) -> None: ...

    async def read_log(self, limit: int = 1000) -> list[LogEntry]: ...

    async def get_image(self, digest: str) -> bytes | None: ...


class MemoryTrajectoryStore:
    """In-process LRU with TTL, bounded in entries; the log is a bounded deque."""

    def __init__(self, *, max_items: int = 1024, ttl_s: float = 3600.0, max_log: int = 10_000) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, Trajectory]] = OrderedDict()
        self._images: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._log: deque[LogEntry] = deque(maxlen=max_log)

    def _live(self, table: OrderedDict[str, tuple[float, object]], key: str) -> object | None:
        item = table.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del table[key]
            return None
        table.move_to_end(key)
        return value

    async def get(self, key: str) -> Trajectory | None:
        value = self._live(self._items, key)  # type: ignore[arg-type]
        return value if isinstance(value, Trajectory) else None

    async def put(self, key: str, trajectory: Trajectory, image_png: bytes | None = None) -> None:
        expires = time.monotonic() + self.ttl_s
        self._items[key] = (expires, trajectory)
        self._items.move_to_end(key)
        if image_png is not None:
            self._images[trajectory.image] = (expires, image_png)
            self._images.move_to_end(trajectory.image)
        for table in (self._items, self._images):
            while len(table) > self.max_items:
                table.popitem(last=False)

    async def append_log(self, entries: Sequence[LogEntry]) -> None:
        self._log.extend(entries)

    async def read_log(self, limit: int = 1000) -> list[LogEntry]:
        return list(self._log)[-limit:]

    async def get_image(self, digest: str) -> bytes | None:
        value = self._live(self._images, digest)  # type: ignore[arg-type]
        return value if isinstance(value, bytes) else None


class GuardedStore:
    """Wraps any store so that it can only ever cost a bounded delay, never a failure.

    Each call has a timeout; an error or timeout counts as a miss and logs one warning until
    the store works again. One guard per Reasoner, so that health is shared by its requests.
    """

    def __init__(self, store: TrajectoryStore, *, timeout_s: float = 0.25) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.healthy = True
        self.failures = 0

    def _failed(self, what: str, e: BaseException) -> None:
        self.failures += 1
        if self.healthy:
            log.warning("trajectory store unavailable (%s: %s); continuing without it", what, e)
        self.healthy = False

    def _ok(self) -> None:
        if not self.healthy:
            log.info("trajectory store is back")
        self.healthy = True

    async def get(self, key: str, *, timeout_s: float | None = None) -> Trajectory | None:
        try:
            with anyio.fail_after(timeout_s or self.timeout_s):
                value = await self.store.get(key)
        except (Exception, TimeoutError) as e:
            self._failed("get", e)
            return None
        self._ok()
        if value is not None and not isinstance(value, Trajectory):
            try:
                value = Trajectory.model_validate(value)
            except ValidationError:
                return None
        return value

    async def put(
        self, key: str, trajectory: Trajectory, image_png: bytes | None = None, *, timeout_s: float | None = None
    ) -> None:
        try:
            with anyio.fail_after(timeout_s or self.timeout_s):
                await self.store.put(key, trajectory, image_png)
        except (Exception, TimeoutError) as e:
            self._failed("put", e)
            return
        self._ok()

    async def append_log(self, entries: Sequence[LogEntry], *, timeout_s: float | None = None) -> None:
        if not entries:
            return
        try:
            with anyio.fail_after(timeout_s or self.timeout_s):
                await self.store.append_log(entries)
        except (Exception, TimeoutError) as e:
            self._failed("append_log", e)
            return
        self._ok()
