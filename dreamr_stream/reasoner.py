"""The Reasoner facade: the stream is the primary API; everything else consumes it."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from PIL import Image

from dreamr_stream.backends import registry
from dreamr_stream.backends.base import AsyncModelBackend, ModelBackend
from dreamr_stream.backends.loading import demo_sources, load_pair
from dreamr_stream.config import SERVED_TARGET_SPECULATING, ReasonerConfig
from dreamr_stream.engine.baselines import run_draft_only, run_sequential, run_target_only
from dreamr_stream.engine.cache import CacheContext, open_cache
from dreamr_stream.engine.fpsr import Inspect, run_fpsr
from dreamr_stream.engine.owner import LoopBackend, OwnerLoop
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.request_messages import Replan
from dreamr_stream.engine.runner import ModelRunner
from dreamr_stream.engine.schedule import PROBE_EVERY, AcceptanceWindow, plan, rows
from dreamr_stream.engine.threads import split_threads as _split
from dreamr_stream.errors import BackendError, ConfigError, DreamrError
from dreamr_stream.events import Event, FailedEvent, FallbackEvent, FinishedEvent, StartedEvent, VerifiedEvent
from dreamr_stream.inputs import ImageInput, check_question, load_image
from dreamr_stream.store import GuardedStore, MemoryTrajectoryStore, TrajectoryStore
from dreamr_stream.tasks import DEFAULT_TASK
from dreamr_stream.types import ReasoningResult, SpeculationPlan, Step
from dreamr_stream.uncalibrated import warn_uncalibrated
from dreamr_stream.verify import Verifier, make_verifier

__all__ = ["UNVERIFIED_METHODS", "Method", "Reasoner"]

log = logging.getLogger(__name__)
Method = Literal["fpsr", "target_only", "draft_only", "sequential"]
# the methods whose steps TBVM never judges: their results do not depend on its mode or tau
UNVERIFIED_METHODS: frozenset[Method] = frozenset({"target_only", "draft_only"})
_RUNS: dict[str, Callable[..., Awaitable[None]]] = {
    "fpsr": run_fpsr,
    "target_only": run_target_only,
    "draft_only": run_draft_only,
    "sequential": run_sequential,
}


def _typed_error(e: BaseException) -> DreamrError:
    """The library error behind ``e``: task groups wrap lane failures in exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = next((x for x in e.exceptions if isinstance(x, (DreamrError, BaseExceptionGroup))), e.exceptions[0])
    if isinstance(e, DreamrError):
        return e
    error = BackendError(f"{type(e).__name__}: {e}")
    error.__cause__ = e
    return error


T = TypeVar("T")


def _is_terminal(event: Event) -> bool:
    """A request's last event, told once the request has ended (``Reasoner._events``)."""
    return isinstance(event, (FinishedEvent, FailedEvent))


class Reasoner:
    """Multimodal speculative reasoning over a target and a draft backend.

    >>> reasoner = Reasoner.demo()
    >>> async for step in reasoner.astream(image, "How many red shapes are there?"):
    ...     print(step.index, step.source.value, step.text)

    One Reasoner serves every caller at once: async code on any event loop (asyncio or trio),
    sync code in any thread (``invoke``, ``stream``), in any mix. Its requests all run on one
    event loop that it owns, in a thread of its own (``engine.owner``): the per-model locks,
    counters and store connections they share belong to that loop, and every entry point routes
    its caller there, so no two loops ever touch them. ``close()`` stops that loop, and releases
    the models when the Reasoner owns them (``owns_backends``).
    """

    def __init__(
        self,
        target: ModelBackend[Any] | AsyncModelBackend[Any],
        draft: ModelBackend[Any] | AsyncModelBackend[Any] | None = None,
        *,
        config: ReasonerConfig | None = None,
        store: TrajectoryStore | None = None,
        split_threads: bool = True,
        loop_backend: LoopBackend = "asyncio",
        owns_backends: bool = False,
    ) -> None:
        """``store``: where verified trajectories are cached (default: in-memory, bounded).
        ``split_threads``: when both models run on the CPU, each model's calls take half of its
        intra-op threads, so that overlapping calls do not fight over the cores
        (``engine.threads``); False leaves the threads as they are. ``loop_backend``: the anyio
        backend of the Reasoner's own event loop, where its requests run (callers may use either).
        ``owns_backends``: ``close()`` also releases the backends (a draft's process stops, a
        served model's connections close); ``from_pretrained`` and ``demo`` set it, since what
        they load belongs to the Reasoner. False: the backends belong to the caller, who may
        share them between Reasoners, and ``close()`` leaves them as they are.

        A served target without verification settings (``settings_from``) and a config that
        leaves tau at its default warn once here (``UncalibratedVerificationWarning``, see
        ``dreamr_stream.uncalibrated``): its drafts would be judged on uncalibrated defaults."""
        self.config = config or ReasonerConfig()
        # whether this Reasoner verifies on settings nobody measured for its target (told once, now)
        self.uncalibrated = warn_uncalibrated(
            registry.capabilities_of(target), self.config, has_draft=draft is not None
        )
        t_threads, d_threads = (
            _split(registry.capabilities_of(target), registry.capabilities_of(draft) if draft is not None else None)
            if split_threads
            else (None, None)
        )
        self.target = ModelRunner(target, "target", t_threads)
        self.draft = ModelRunner(draft, "draft", d_threads) if draft is not None else None
        self.store = store if store is not None else MemoryTrajectoryStore()
        self._store_guard = GuardedStore(self.store)
        self.loop = OwnerLoop(name="dreamr-reasoner", backend=loop_backend)  # started on first use
        self.active_requests = 0
        self._load_event: anyio.Event | None = None  # set when active_requests changes (made on the loop)
        self.acceptance = AcceptanceWindow()  # the draft's rolling acceptance, for the schedule
        self.owns_backends = owns_backends
        self._released = False  # the owned backends were released: no more requests

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        *,
        target: str | Path,
        draft: str | Path | None = None,
        config: ReasonerConfig | None = None,
        device: str = "auto",
        draft_process: bool | None = None,
        draft_stand_in: bool = False,
        settings_from: str | Path | None = None,
    ) -> Reasoner:
        """Load local model folders (no downloads) into transformers backends, or reach models
        served by vLLM: a ``target`` or ``draft`` that is a URL (``http://host:8000/v1``) is
        driven over the server's OpenAI-compatible API (``backends.vllm``; nothing connects
        before the first request). Each is opened by ``backends.registry.open`` and loaded by
        ``backends.loading.load_pair``. The Reasoner owns what it loads: ``close()`` releases it.

        ``draft_process``: serve a local draft from its own process (``ProcessBackend``), so that
        its calls overlap the target's instead of waiting for this process's GIL; default: on
        when the models run on the CPU (on a GPU the lanes overlap on CUDA streams).
        ``draft_stand_in``: with the draft in a process, also load it here and serve the
        requests that start before the process is ready from this copy (the same steps, with
        less overlap: ``ProcessBackend.use_stand_in``), instead of waiting for the process
        before returning. For interactive use (``dreamr reason``): a benchmark that times the
        first requests would time the stand-in.
        ``settings_from``: a local folder whose ``dreamr.json`` (judge template, recommended
        verification, task) applies to a served target (a local target folder has its own): the
        target's folder, or one that ``dreamr calibrate`` measured against the server. A served
        target without it runs on uncalibrated verification and warns once
        (``UncalibratedVerificationWarning``); the draft's ``dreamr.json`` is never read for the
        target. Without a ``config``, the target's recommended verification applies."""
        models = load_pair(
            target,
            draft,
            device=device,
            draft_process=draft_process,
            draft_stand_in=draft_stand_in,
            settings_from=settings_from,
        )
        return cls(
            models.target,
            models.draft,
            config=config if config is not None else models.recommended_config(),
            owns_backends=True,
        )

    @classmethod
    def demo(
        cls,
        *,
        draft: str | None = None,
        config: ReasonerConfig | None = None,
        device: str = "cpu",
        draft_process: bool | None = None,
        draft_stand_in: bool = False,
        target_url: str | None = None,
        draft_url: str | None = None,
        task: str = DEFAULT_TASK,
    ) -> Reasoner:
        """The shipped demo models (CPU, no downloads) of ``task`` (``dreamr_stream.tasks``;
        default: the grid task). ``draft`` names a shipped draft (``sft`` or ``sapo``; default:
        the SAPO draft when it ships); ``draft_process`` and ``draft_stand_in`` as in
        ``from_pretrained``. ``target_url`` / ``draft_url``: the same models served by vLLM
        (``python -m dreamr_vllm``), reached over HTTP."""
        shipped = demo_sources(draft, task=task, target_url=target_url, draft_url=draft_url)
        return cls.from_pretrained(
            target=shipped.target,
            draft=shipped.draft,
            config=config,
            device=device,
            draft_process=draft_process,
            draft_stand_in=draft_stand_in,
            settings_from=shipped.settings_from,
        )

    # ------------------------------------------------------------------ state
    @property
    def task(self) -> str | None:
        """The task the target was trained on (its ``dreamr.json`` "task"); None when unknown."""
        return self.target.capabilities.task

    @property
    def in_flight(self) -> int:
        """Model calls running in worker threads right now (all requests)."""
        return self.target.in_flight + (self.draft.in_flight if self.draft else 0)

    def _speculation_limit(self, config: ReasonerConfig) -> int | None:
        limit = config.scheduling.max_speculating
        if limit != "auto":
            return limit
        return SERVED_TARGET_SPECULATING if self.target.concurrent else None

    def speculation_plan(
        self,
        config: ReasonerConfig | None = None,
        *,
        in_flight: int | None = None,
        probe: bool = False,
        by_acceptance: bool = True,
    ) -> SpeculationPlan:
        """What the speculation schedule (``engine.schedule``) gives a request starting now (or
        with ``in_flight`` requests in flight, itself included). ``by_acceptance``: False for a
        request under way, replanned by the load alone (its acceptance was judged as it started,
        which a probe must outlive)."""
        cfg = config or self.config
        return plan(
            rows(cfg.scheduling, self._speculation_limit(cfg)),
            in_flight=self.active_requests + 1 if in_flight is None else in_flight,
            acceptance=self.acceptance.value if by_acceptance else None,
            min_acceptance=cfg.scheduling.min_acceptance,
            probe=probe,
            max_lookahead=cfg.generation.max_steps,
        )

    def _start_plan(self, cfg: ReasonerConfig) -> tuple[SpeculationPlan, ReasonerConfig]:
        """A speculative request's plan as it starts, and its config with the plan's TBVM mode
        (taken only where the target's folder measured a tau for that mode)."""
        window = self.acceptance
        low = window.value is not None and window.value < cfg.scheduling.min_acceptance
        if low:
            window.low += 1
        chosen = self.speculation_plan(cfg, probe=low and window.low % PROBE_EVERY == 0)
        taus = self.target.capabilities.recommended_verification.get("taus") or {}
        if chosen.mode is not None and chosen.mode != cfg.verification.mode and chosen.mode in taus:
            cfg = cfg.override(mode=chosen.mode, tau=float(taus[chosen.mode]))  # type: ignore[arg-type]
        return chosen, cfg

    def _verifier(self, config: ReasonerConfig) -> Verifier:
        return make_verifier(config.verification)

    async def _cache_context(self, cfg: ReasonerConfig, image: Any, question: str) -> CacheContext | None:
        if self.draft is None:
            return None
        return await open_cache(cfg, self._store_guard, self.target, self.draft, image, question)

    # ------------------------------------------------------------------ streams
    async def astream_events(
        self,
        image: ImageInput,
        question: str,
        *,
        method: Method = "fpsr",
        config: ReasonerConfig | None = None,
        inspect: Inspect | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Every engine event of one request; ends with ``finished`` or ``failed``.

        Leaving the loop early (break, cancellation, a closed client) cancels the request and
        waits for its lanes, so no model call of it outlives the stream. ``inspect`` is called
        on the Reasoner's own loop thread.
        """

        async def events() -> AsyncGenerator[Event, None]:
            async with aclosing(self._events(image, question, method=method, config=config, inspect=inspect)) as out:
                async for event, _ in out:
                    yield event

        async with aclosing(self.loop.aiterate(events, last=_is_terminal)) as stream:
            async for event in stream:
                yield event

    async def astream(
        self, image: ImageInput, question: str, *, method: Method = "fpsr", config: ReasonerConfig | None = None
    ) -> AsyncGenerator[Step, None]:
        """Verified steps only, each as soon as it is verified. Raises the request's error."""
        async with aclosing(self.loop.aiterate(lambda: self._steps(image, question, method, config))) as steps:
            async for step in steps:
                yield step

    async def ainvoke(
        self, image: ImageInput, question: str, *, method: Method = "fpsr", config: ReasonerConfig | None = None
    ) -> ReasoningResult:
        return await self.loop.acall(self._result, image, question, method, config)

    def invoke(
        self, image: ImageInput, question: str, *, method: Method = "fpsr", config: ReasonerConfig | None = None
    ) -> ReasoningResult:
        """Synchronous ``ainvoke``, from any thread (also one running an event loop: it blocks
        that loop meanwhile), but not from the Reasoner's own loop (``inspect`` callbacks)."""
        return self.loop.call(self._result, image, question, method, config)

    def stream(
        self, image: ImageInput, question: str, *, method: Method = "fpsr", config: ReasonerConfig | None = None
    ) -> Generator[Step, None, None]:
        """Synchronous ``astream``, from any thread; ``close()`` on the generator (or leaving a
        ``with contextlib.closing(...)`` block) cancels the request and waits for its lanes."""
        return self.loop.iterate(lambda: self._steps(image, question, method, config))

    def call_model(self, fn: Callable[..., T], *args: Any, model: Literal["target", "draft"] = "target") -> T:
        """Run ``fn(*args)`` as one call of the named model, on the threads and behind the lock
        the Reasoner's own model calls use. For baselines outside the engine (a plain
        ``generate()``): torch work on another thread leaves it a second OpenMP thread team,
        which on a 2-core CPU slowed the Reasoner's decoding afterwards by up to 50%."""
        self._check_open()
        runner = self.target if model == "target" else self.draft
        if runner is None:
            raise ConfigError("this Reasoner has no draft model")

        async def run() -> T:
            return await runner.call(fn, *args)

        return self.loop.call(run)

    def close(self) -> None:
        """Stop the Reasoner's event loop: streams still running are cancelled, calls in flight
        finish first; a later call starts a new loop. A Reasoner that owns its backends
        (``owns_backends``) also releases them, and refuses requests from then on."""
        if self.owns_backends and not self._released:
            self._released = True
            if any(r.capabilities.release == "async" for r in self._runners()):
                self.loop.call(self._aclose_backends)  # their connections belong to this loop
        self.loop.close()
        if self._released:
            for runner in self._runners():
                registry.shutdown(runner.backend)  # a draft's process (ProcessBackend)

    def _runners(self) -> list[ModelRunner]:
        return [r for r in (self.target, self.draft) if r is not None]

    async def _aclose_backends(self) -> None:
        for runner in self._runners():
            await registry.aclose(runner.backend)

    def _check_open(self) -> None:
        if self._released:
            raise ConfigError("this Reasoner was closed and its models released; build a new one")

    # ------------------------------------------------------------------ on the Reasoner's loop
    async def _steps(
        self, image: ImageInput, question: str, method: Method, config: ReasonerConfig | None
    ) -> AsyncGenerator[Step, None]:
        async with aclosing(self._events(image, question, method=method, config=config)) as events:
            async for event, error in events:
                if error is not None:
                    raise error
                if isinstance(event, (VerifiedEvent, FallbackEvent)):
                    yield event.step

    async def _result(
        self, image: ImageInput, question: str, method: Method, config: ReasonerConfig | None
    ) -> ReasoningResult:
        async with aclosing(self._events(image, question, method=method, config=config)) as events:
            async for event, error in events:
                if error is not None:
                    raise error
                if isinstance(event, FinishedEvent):
                    return event.result
        raise BackendError("the request ended without a result")  # pragma: no cover - defensive

    async def _produce(
        self,
        ctx: RequestContext,
        image: Image.Image,
        send: MemoryObjectSendStream[tuple[Event, DreamrError | None]],
        inspect: Inspect | None,
    ) -> None:
        """One request from its start event to its end: finished with the result, or failed
        with the typed error (sent beside the event, for the caller that raises it)."""
        method = ctx.method
        await ctx.emit(StartedEvent(question=ctx.question, method=method))
        try:
            if method == "fpsr":
                replan = self._replanner(ctx)
                await run_fpsr(ctx, image, replan=replan, load_changed=self._load_changed, inspect=inspect)
                self.acceptance.add(ctx.counts["judged"], ctx.counts["accepted"])
            else:
                await _RUNS[method](ctx, image)
        except Exception as e:
            error = _typed_error(e)
            log.warning("request failed: %s", error)
            await send.send((FailedEvent(error=type(error).__name__, message=str(error), elapsed_s=ctx.now()), error))
            return
        await ctx.emit(FinishedEvent(result=ctx.result(), elapsed_s=ctx.now()))

    def _load_changes(self, delta: int) -> None:
        """Count a request in (+1) or out (-1) and wake whoever waits for the load to change."""
        self.active_requests += delta
        event, self._load_event = self._load_event, None
        if event is not None:
            event.set()

    async def _load_changed(self) -> None:
        """Return at the next change of the requests in flight."""
        if self._load_event is None:
            self._load_event = anyio.Event()
        await self._load_event.wait()

    def _replanner(self, ctx: RequestContext) -> Callable[[], Replan]:
        """The schedule for ``ctx`` once under way: what the load now gives it."""

        def replan() -> Replan:
            now = self.speculation_plan(ctx.config, in_flight=self.active_requests, by_acceptance=False)
            return Replan(now.lookahead, now.reason)

        return replan

    async def _events(
        self,
        image: ImageInput,
        question: str,
        *,
        method: Method,
        config: ReasonerConfig | None,
        inspect: Inspect | None = None,
    ) -> AsyncGenerator[tuple[Event, DreamrError | None], None]:
        self._check_open()
        cfg = config or self.config
        if method not in _RUNS:
            raise ConfigError(f"unknown method {method!r}; choose one of {sorted(_RUNS)}")
        if method != "target_only" and self.draft is None:
            raise ConfigError(f"method {method!r} needs a draft model")
        # input checks before any model work
        pil = await anyio.to_thread.run_sync(load_image, image, cfg.limits)  # decoding may be slow
        text = check_question(question, cfg.limits)
        schedule, cache = None, None
        if method == "fpsr":  # the speculation schedule, which may choose the TBVM mode, then the cache
            schedule, cfg = self._start_plan(cfg)
            cache = await self._cache_context(cfg, pil, text)
        send, recv = anyio.create_memory_object_stream[tuple[Event, DreamrError | None]](math.inf)

        async def emit(event: Event) -> None:
            await send.send((event, None))

        ctx = RequestContext(
            config=cfg,
            question=text,
            method=method,
            emit=emit,
            target=self.target,
            draft=self.draft,
            verifier=self._verifier(cfg),
            cache=cache,
            schedule=schedule,
        )
        scope = anyio.CancelScope()

        async def produce() -> None:
            with scope, send:
                await self._produce(ctx, pil, send, inspect)

        # The request runs in a task of the loop's own, not in a task group spanning our yields:
        # a consumer that breaks out lets this generator be closed from another task (asyncio
        # finalises a dropped generator in a task of its own), and the cleanup below (cancel,
        # then wait) is valid from any task of the loop.
        finished = anyio.Event()
        crashed: list[BaseException] = []

        async def request() -> None:
            try:
                await produce()
            except Exception as e:  # a bug in the engine itself: raised to the consumer below
                crashed.append(e)
            finally:
                self._load_changes(-1)
                finished.set()

        self._load_changes(+1)
        self.loop.start_soon(request)
        try:
            async with recv:
                async for item in recv:
                    if _is_terminal(item[0]):
                        # the request's end is told once it has ended: its sessions closed and
                        # its counters down, wherever the consumer reads them
                        await finished.wait()
                    yield item
        finally:
            # anyio cancellation: it honours the shielded waits for model calls already running
            # in threads, so when the task ends no call is left behind
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await finished.wait()
            if crashed:
                raise BackendError("the engine crashed") from crashed[0]
