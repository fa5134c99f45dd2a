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
* a blocking backend that batches steps (``Capabilities.batches``) decodes, at chunk granularity,
  the ``generate_step`` calls of many requests together: when the model frees, the call that gets
  the lock gathers every ``generate_step`` call waiting for it (up to ``batches`` rows, in the
  lock's order: verification's priority first) into one ``generate_batch``, and each caller gets
  its own output. A request thus joins the batch at its next chunk and leaves it when its step
  ends; a call that is alone goes as a plain ``generate_step``, and the other operations keep
  going one at a time, between batches. A caller cancelled while it waits leaves the queue; one
  cancelled while its batch runs waits for the batch (its session must not change after it has
  left), then raises the cancellation, also on a backend whose single calls may be abandoned (a
  batch serves other callers too; its own deadline bounds it). A batch that fails fails each of
  its callers with a ``BackendError``;
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
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import anyio

from dreamr_stream.backends.base import (
    AsyncModelBackend,
    Batches,
    Capabilities,
    ModelBackend,
    Repairs,
    ScoreOutput,
    Session,
    SetsThreads,
    StepCall,
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


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    event: anyio.Event = field(compare=False)
    item: object = field(compare=False, default=None)
    gathered: bool = field(compare=False, default=False)


class PriorityLock:
    """An async lock whose waiters are served by priority, then arrival order.

    A waiter may carry an ``item``; the holder may ``gather`` waiting items (their ``acquire``
    returns False: they were served by the holder, and do not hold the lock).

    While it is held it belongs to the event loop (thread) that took it, a Reasoner's own loop
    (``engine.owner``): its waiters wait on that loop's events, which no other loop can wake, so
    a second loop that waited on it would hang. That use raises at once instead. A free lock
    holds no loop's state, so a Reasoner whose loop was closed and started again keeps its locks.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[_Waiter] = []
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

    async def acquire(self, priority: int = 0, item: object = None) -> bool:
        """Wait for the lock: True once held; False when the holder gathered ``item`` instead."""
        self._check_thread()
        if not self._held and not self._waiters:
            self._held = True
            return True
        waiter = _Waiter(priority, next(self._counter), anyio.Event(), item)
        heapq.heappush(self._waiters, waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                heapq.heapify(self._waiters)
            elif waiter.event.is_set() and not waiter.gathered:  # woken and cancelled at once: pass the lock on
                self.release()
            raise
        return not waiter.gathered

    def gather(self, accepts: Callable[[object], bool], limit: int) -> list[Any]:
        """For the holder: take up to ``limit`` waiting items that ``accepts``, in the order the
        lock would serve them; their waiters stop waiting (``acquire`` returns False)."""
        chosen = [w for w in sorted(self._waiters) if accepts(w.item)][: max(limit, 0)]
        if chosen:
            self._waiters = [w for w in self._waiters if not any(w is c for c in chosen)]
            heapq.heapify(self._waiters)
        for w in chosen:
            w.gathered = True
            w.event.set()
        return [w.item for w in chosen]

    def release(self) -> None:
        if self._waiters:
            heapq.heappop(self._waiters).event.set()  # ownership passes directly to the next waiter
        else:
            self._held = False


@dataclass(eq=False)
class _Row:
    """A ``generate_step`` call waiting to be decoded, alone or in a batch."""

    call: StepCall
    done: anyio.Event = field(default_factory=anyio.Event)
    batched: bool = False  # another caller's batch took it
    out: StepOutput | None = None
    error: BaseException | None = None

    def result(self, name: str) -> StepOutput:
        """The output, or the batch's failure as a ``BackendError`` of this caller's own (one
        exception object raised in several tasks would mix their tracebacks)."""
        if self.error is not None:
            e = self.error
            raise BackendError(f"{name}: a batch of steps failed: {type(e).__name__}: {e}") from e
        assert self.out is not None
        return self.out


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
        # the most steps one model call decodes together (``generate_batch``; below 2: none)
        self.batches = caps.batches if not caps.concurrent and caps.batches > 1 else 0
        self.lock = PriorityLock()
        self.in_flight = 0  # model calls running in a thread now
        self.calls = 0
        self.batched_steps = 0  # generate_step calls decoded in a batch of several

    async def call(
        self, fn: Callable[..., T], *args: Any, priority: int = 0, abandonable: bool = False, **kwargs: Any
    ) -> T:
        """``fn(*args, **kwargs)`` in a worker thread, behind the model's lock. ``abandonable``:
        a cancelled caller leaves at once (the backend settles the call: ``backends.call_context``);
        else it waits for the call, since a thread cannot be killed and no model call may
        outlive its request."""
        await self.lock.acquire(priority)
        try:
            return await self._in_thread(fn, *args, abandonable=abandonable, **kwargs)
        finally:
            self.lock.release()

    async def _in_thread(self, fn: Callable[..., T], *args: Any, abandonable: bool, **kwargs: Any) -> T:
        """One model call in a worker thread, the lock held."""
        threads, threaded = self.threads, self._threaded
        watch = CallWatch()
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

    async def _step(self, call: StepCall, priority: int) -> StepOutput:
        """A ``generate_step`` call on a backend that batches: the caller that gets the lock
        decodes every step call waiting for it in one ``generate_batch`` (the module's docstring)."""
        row = _Row(call)
        try:
            holds = await self.lock.acquire(priority, row)
        except anyio.get_cancelled_exc_class():
            if row.batched:  # woken into a batch as it was cancelled: the batch runs with its row
                await self._outlive(row)
            raise
        if not holds:  # in another caller's batch
            try:
                await row.done.wait()
            except anyio.get_cancelled_exc_class():
                await self._outlive(row)
                raise
            return row.result(self.name)
        try:
            rows = [row, *self.lock.gather(lambda item: isinstance(item, _Row), self.batches - 1)]
            for r in rows[1:]:
                r.batched = True
            if len(rows) == 1:  # alone: a plain call, cancelled as any other
                c = call
                step = cast(ModelBackend[Any], self.backend).generate_step
                kwargs = {"max_tokens": c.max_tokens, "stop": c.stop, "temperature": c.temperature, "budget": c.budget}
                return await self._in_thread(step, c.session, abandonable=self.abandonable, **kwargs)
            await self._batch(rows)
        finally:
            self.lock.release()
        await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled while its batch ran: leave now
        return row.result(self.name)

    async def _batch(self, rows: list[_Row]) -> None:
        """Decode ``rows`` in one ``generate_batch`` and hand each its output (or the failure).
        Shielded: every row's caller waits for it, cancelled or not."""
        batch = cast(Batches, self.backend).generate_batch
        with anyio.CancelScope(shield=True):
            try:
                outs = await self._in_thread(batch, [r.call for r in rows], abandonable=False)
                if len(outs) != len(rows):
                    raise BackendError(f"{self.name}: generate_batch gave {len(outs)} outputs for {len(rows)} steps")
                for r, out in zip(rows, outs, strict=True):
                    r.out = out
                self.batched_steps += len(rows)
            except BaseException as e:
                for r in rows:
                    r.error = e
                if not isinstance(e, Exception):
                    raise
            finally:
                for r in rows:
                    r.done.set()

    @staticmethod
    async def _outlive(row: _Row) -> None:
        """A cancelled caller whose row is in a batch waits for that batch: the engine rolls its
        session back once it has left, which must not happen while the batch still writes it."""
        with anyio.CancelScope(shield=True):
            await row.done.wait()

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
        if self.batches:
            try:
                return await self._step(StepCall(session, max_tokens, stop, temperature, budget), priority)
            except DreamrError:
                raise
            except Exception as e:
                raise self._failed("generate_step", e) from e
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
        if not self.streams_rest:
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
    def streams_rest(self) -> bool:
        """The backend writes the rest of an answer in one call (``generate_rest``)."""
        return self.concurrent and self.capabilities.streams_rest

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
