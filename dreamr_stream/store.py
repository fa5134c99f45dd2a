"""Trajectory store: verified trajectories as free drafts, and a verification log for SAPO.

* ``TrajectoryStore`` is the protocol; ``MemoryTrajectoryStore`` (an LRU with TTL, bounded in
  entries and in bytes) is the embedded default; ``dreamr_redis.RedisTrajectoryStore`` shares one
  cache between replicas.
* The prompt image is kept beside its trajectory (SAPO rebuilds prompts from the log) as a PNG
  scaled down to what the models read (``stored_image``); an image over ``STORED_IMAGE_BYTES``
  is kept by no store. An upload can be megapixels: kept as it came, a few of them would fill
  any budget.
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
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import anyio
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dreamr_stream.types import Verdict

__all__ = [
    "STORED_IMAGE_BYTES",
    "STORED_IMAGE_SIDE",
    "GuardedStore",
    "LogEntry",
    "MemoryTrajectoryStore",
    "Trajectory",
    "TrajectoryStore",
    "image_digest",
    "image_png",
    "normalise_question",
    "settings_fingerprint",
    "storable_image",
    "stored_image",
    "trajectory_key",
]

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
STORED_IMAGE_SIDE = 448  # the long side of a stored image: what the models' processors read, and more
STORED_IMAGE_BYTES = 2 * 2**20  # the largest stored image, in every store
_ENTRY_OVERHEAD = 512  # bytes of a memory store entry beside its value: key, tuple, table slot


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


def stored_image(image: Image.Image, max_side: int = STORED_IMAGE_SIDE) -> bytes:
    """The PNG a store keeps of a prompt image: scaled down to ``max_side`` on its long side.

    An image already that small is kept pixel for pixel (the demo's puzzles are), so a prompt
    rebuilt from the store is the prompt the request ran on. Runs in a worker thread.
    """
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image_png(image)


def storable_image(png: bytes | None, max_bytes: int = STORED_IMAGE_BYTES) -> bytes | None:
    """``png`` if a store may keep it, else None: every store applies the same cap."""
    if png is None or len(png) <= max_bytes:
        return png
    log.debug("not storing a %d-byte image (the cap is %d)", len(png), max_bytes)
    return None


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
    """In-process LRU with TTL, bounded in entries (of each kind) and in bytes; the log is a bounded deque.

    Trajectories and images share one use order and one byte budget, so the least recently used
    entry of either kind goes first when a new one does not fit. Expired entries are dropped when
    read, or in turn as the least recently used.
    """

    def __init__(
        self,
        *,
        max_items: int = 1024,
        max_bytes: int = 64 * 2**20,
        max_image_bytes: int = STORED_IMAGE_BYTES,
        ttl_s: float = 3600.0,
        max_log: int = 10_000,
    ) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_image_bytes = max_image_bytes
        self.ttl_s = ttl_s
        # ("traj", key) or ("img", digest) -> (expires, value, its size), least recently used first
        self._entries: OrderedDict[tuple[str, str], tuple[float, Trajectory | bytes, int]] = OrderedDict()
        self._counts: Counter[str] = Counter()
        self.nbytes = 0  # the sizes of every entry held
        self._log: deque[LogEntry] = deque(maxlen=max_log)

    def _live(self, kind: str, key: str) -> Trajectory | bytes | None:
        item = self._entries.get((kind, key))
        if item is None:
            return None
        expires, value, _ = item
        if expires < time.monotonic():
            self._drop((kind, key))
            return None
        self._entries.move_to_end((kind, key))
        return value

    def _drop(self, entry: tuple[str, str]) -> None:
        _, _, size = self._entries.pop(entry)
        self._counts[entry[0]] -= 1
        self.nbytes -= size

    def _keep(self, kind: str, key: str, value: Trajectory | bytes, size: int, expires: float) -> None:
        if (kind, key) in self._entries:
            self._drop((kind, key))
        if size > self.max_bytes:  # would evict everything else and still not fit
            return
        self._entries[(kind, key)] = (expires, value, size)
        self._counts[kind] += 1
        self.nbytes += size
        while self._counts[kind] > self.max_items:  # the oldest of this kind
            self._drop(next(e for e in self._entries if e[0] == kind))
        while self.nbytes > self.max_bytes:  # the oldest of any kind
            self._drop(next(iter(self._entries)))

    async def get(self, key: str) -> Trajectory | None:
        value = self._live("traj", key)
        return value if isinstance(value, Trajectory) else None

    async def put(self, key: str, trajectory: Trajectory, image_png: bytes | None = None) -> None:
        expires = time.monotonic() + self.ttl_s
        # the text as stored, plus what Python adds around a few strings: an estimate, not a measure
        self._keep("traj", key, trajectory, len(trajectory.model_dump_json()) + _ENTRY_OVERHEAD, expires)
        image_png = storable_image(image_png, self.max_image_bytes)
        if image_png is not None:
            self._keep("img", trajectory.image, image_png, len(image_png) + _ENTRY_OVERHEAD, expires)

    async def append_log(self, entries: Sequence[LogEntry]) -> None:
        self._log.extend(entries)

    async def read_log(self, limit: int = 1000) -> list[LogEntry]:
        return list(self._log)[-limit:]

    async def get_image(self, digest: str) -> bytes | None:
        value = self._live("img", digest)
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
