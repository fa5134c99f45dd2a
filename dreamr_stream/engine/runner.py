"""The engine's one async interface to a model, whatever serves it.

``ModelRunner`` offers the backend operations as coroutines (``open_session``, ``generate_step``,
``score``, ``append``, ``rollback``, ``fork``, ``close``) and hides how the model is reached:

* a blocking, in-process backend (``ModelBackend``: transformers, a child process) computes one
  call at a time: every call waits for the model's lock (lower ``priority`` value first, FIFO
  within a priority), then runs in a worker thread. Calls are short (one step chunk, one scoring
  forward), so a cancelled request stops within one call, and verification (priority 0)
  overtakes a speculative fallback (priority 1) at the next call. A backend that declares its
  calls ``abandonable`` (a child process) is not waited for at all: a cancelled request leaves
  at once and the backend settles the call (``backends.call_context``), since a stopped or hung
  child would otherwise hold the cancel until the call's deadline. A runner may fix its
  model's intra-op threads for every call (``engine.threads``);
* an async backend (``AsyncModelBackend``: a model behind a serving engine such as vLLM) is
  awaited directly, with no lock: the server batches concurrent calls, which is the point of
  serving there, and cancelling a call closes its connection, so the server stops at once.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, TypeVar, cast

import anyio

from dreamr_stream.backends.base import (
    AsyncModelBackend,
    Capabilities,
    ModelBackend,
    Repairs,
    ScoreOutput,
    Session,
    SetsThreads,
    StepOutput,
    StreamsRest,
)
from dreamr_stream.backends.call_context import CallWatch, watching
from dreamr_stream.backends.registry import capabilities_of
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import BackendError, DreamrError

__all__ = ["ModelRunner", "Priority", "PriorityLock"]

T = TypeVar("T")


class Priority:
    VERIFY = 0
    DRAFT = 0
    FALLBACK = 1


class PriorityLock:
    """An async lock whose waiters are served by priority, then arrival order.

    While it is held it belongs to the event loop (thread) that took it, a Reasoner's own loop
    (``engine.owner``): its waiters wait on that loop's events, which no other loop can wake, so
    a second loop that waited on it would hang. That use raises at once instead. A free lock
    holds no loop's state, so a Reasoner whose loop was closed and started again keeps its locks.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, anyio.Event]] = []
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    @property
    def locked(self) -> bool:
        return self._held

    def _check_thread(self) -> None:
        here = threading.current_thread()
        if not self._held:
            self._thread = here
        elif here is not self._thread:
            assert self._thread is not None
            raise RuntimeError(
                f"a model lock of one event loop (thread {self._thread.name!r}) was used from another "
                f"({here.name!r}); reach a Reasoner through its public methods, which route every caller to its loop"
            )

    async def acquire(self, priority: int = 0) -> None:
        self._check_thread()
        if not self._held and not self._waiters:
            self._held = True
            return
        entry = (priority, next(self._counter), anyio.Event())
        heapq.heappush(self._waiters, entry)
        try:
            await entry[2].wait()
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            elif entry[2].is_set():  # woken and cancelled at once: pass the lock on
                self.release()
            raise

    def release(self) -> None:
        if self._waiters:
            _, _, event = heapq.heappop(self._waiters)
            event.set()  # ownership passes directly to the next waiter
        else:
            self._held = False


class ModelRunner:
    """A backend plus its lock and counters; shared by every request on that model."""

    def __init__(
        self, backend: ModelBackend[Any] | AsyncModelBackend[Any], name: str, threads: int | None = None
    ) -> None:
        self.backend = backend
        self.name = name
        caps = capabilities_of(backend)
        # an async backend is awaited as it is; a blocking one goes through ``call``
        self.concurrent = caps.concurrent
        # a cancelled request leaves its blocking call to the backend instead of waiting for it
        self.abandonable = caps.abandonable and not caps.concurrent
        # intra-op threads of every call (None: as the thread has them); only a backend that
        # can set them takes them
        self._threaded = cast(SetsThreads, backend) if caps.sets_threads else None
        self.threads = threads if self._threaded is not None else None
        self.lock = PriorityLock()
        self.in_flight = 0  # model calls running in a thread now
        self.calls = 0

    async def call(
        self, fn: Callable[..., T], *args: Any, priority: int = 0, abandonable: bool = False, **kwargs: Any
    ) -> T:
        """``fn(*args, **kwargs)`` in a worker thread, behind the model's lock. ``abandonable``:
        a cancelled caller leaves at once (the backend settles the call: ``backends.call_context``);
        else it waits for the call, since a thread cannot be killed and no model call may
        outlive its request."""
        await self.lock.acquire(priority)
        threads, threaded = self.threads, self._threaded
        watch = CallWatch()
        try:
            self.in_flight += 1
            self.calls += 1

            def run() -> T:
                if threads is not None and threaded is not None:  # in the worker thread: OpenMP's count is per thread
                    threaded.use_threads(threads)
                with watching(watch):
                    return fn(*args, **kwargs)

            try:
                return await anyio.to_thread.run_sync(run, abandon_on_cancel=abandonable)
            except anyio.get_cancelled_exc_class():
                watch.abandon()  # only an abandonable call gets here before its thread has ended
                raise
            finally:
                self.in_flight -= 1
        finally:
            self.lock.release()

    async def _op(self, op: str, fn: Callable[..., Any], *args: Any, priority: int = 0, **kwargs: Any) -> Any:
        """``fn``, the backend's method ``op``, called as its kind of backend needs."""
        try:
            if not self.concurrent:
                return await self.call(fn, *args, priority=priority, abandonable=self.abandonable, **kwargs)
            self.in_flight += 1
            self.calls += 1
            try:
                return await fn(*args, **kwargs)
            finally:
                self.in_flight -= 1
        except DreamrError:
            raise
        except Exception as e:
            raise self._failed(op, e) from e

    def _failed(self, op: str, e: Exception) -> BackendError:
        """Any other exception from a backend (a torch error, a child's traceback, a broken
        connection) as a BackendError: the engine treats a failing draft as optional
        (``go_alone``) by that type, whatever the backend raised."""
        return BackendError(f"{self.name}: {op} failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ the backend operations
    async def open_session(self, image: Any, question: str, *, seed: int = 0, priority: int = 0) -> Session:
        fn = self.backend.open_session
        return await self._op("open_session", fn, image, question, seed=seed, priority=priority)  # type: ignore[no-any-return]

    async def generate_step(
        self,
        session: Session,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
        priority: int = 0,
    ) -> StepOutput:
        if self.concurrent:  # a cancellable call needs no chunking: one call writes the whole step
            budget = None
        return await self._op(  # type: ignore[no-any-return]
            "generate_step",
            self.backend.generate_step,
            session,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            budget=budget,
            priority=priority,
        )

    async def generate_rest(
        self, session: Session, *, max_tokens: int, stop: str, max_steps: int, temperature: float = 0.0
    ) -> AsyncGenerator[StepOutput, None]:
        """The backend's steps from one call (``Capabilities.streams_rest``, an async backend),
        yielded as they are written; any failure is a BackendError, as every other op's."""
        if not (self.concurrent and self.capabilities.streams_rest):
            raise BackendError(f"{self.name}: this backend cannot write the rest of an answer in one call")
        rest = cast(StreamsRest, self.backend).generate_rest(
            session, max_tokens=max_tokens, stop=stop, max_steps=max_steps, temperature=temperature
        )
        self.in_flight += 1
        self.calls += 1
        try:
            async with aclosing(rest) as steps:  # type: ignore[type-var]
                async for out in steps:
                    yield out
        except DreamrError:
            raise
        except Exception as e:
            raise self._failed("generate_rest", e) from e
        finally:
            self.in_flight -= 1

    async def score(
        self, session: Session, text: str, *, stop: str, judge: JudgeTemplate | None, priority: int = 0
    ) -> ScoreOutput:
        fn = self.backend.score
        return await self._op("score", fn, session, text, stop=stop, judge=judge, priority=priority)  # type: ignore[no-any-return]

    async def append(self, session: Session, text: str, *, stop: str, priority: int = 0) -> int:
        fn = self.backend.append
        return await self._op("append", fn, session, text, stop=stop, priority=priority)  # type: ignore[no-any-return]

    async def rollback(self, session: Session, n_tokens: int, *, priority: int = 0) -> None:
        await self._op("rollback", self.backend.rollback, session, n_tokens, priority=priority)

    async def fork(self, session: Session, *, priority: int = 0) -> Session:
        return await self._op("fork", self.backend.fork, session, priority=priority)  # type: ignore[no-any-return]

    @property
    def capabilities(self) -> Capabilities:
        """What the backend declares it can do (``backends.registry.capabilities_of``), read
        afresh: a backend may learn more once started (a child process's model)."""
        return capabilities_of(self.backend)

    @property
    def can_repair(self) -> bool:
        """The backend can start a step from a given text (``begin_step``)."""
        return self.capabilities.repair

    async def begin_step(self, session: Session, text: str, *, proposal: str = "", priority: int = 0) -> int:
        """Start a step from ``text``; only for a backend that declares ``repair``."""
        if not self.can_repair:
            raise BackendError(f"{self.name}: this backend cannot start a step from a text (no repair)")
        begin = cast(Repairs, self.backend).begin_step
        return await self._op("begin_step", begin, session, text, proposal=proposal, priority=priority)  # type: ignore[no-any-return]

    def close(self, session: Session) -> None:
        """Free a session (never blocks: called from cleanup paths on the event loop)."""
        self.backend.close(session)
