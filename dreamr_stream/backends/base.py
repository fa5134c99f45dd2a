"""The backend protocols: per-request sessions that own their model state.

Text crosses the draft/target boundary, never token ids: the two models may have different
tokenizers. Two flavours of one interface:

* ``ModelBackend``: every method is synchronous and may block (a model computing in this
  process or in a child); the engine calls them from worker threads, one call at a time per
  model (``engine.runner``), never on the event loop;
* ``AsyncModelBackend``: the same operations as coroutines, for a model that a server computes
  (``backends.vllm``): calls from many requests run at once and the server batches them.

Each also declares what it can do in one typed value, ``Capabilities`` (its optional operations,
``begin_step``, ``generate_batch``, ``use_threads``, ``shutdown``/``aclose``, included), which the
engine reads instead of inspecting the object.

A session's ``length`` counts whatever unit its backend rolls back by: tokens for an
in-process model, characters for a session held on the client of a remote one. The engine only
ever subtracts lengths of one session and passes them back to ``rollback``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar, overload, runtime_checkable

from PIL import Image

from dreamr_stream.config import JudgeTemplate

__all__ = [
    "AsyncModelBackend",
    "AsyncReleases",
    "Batches",
    "Capabilities",
    "ComputedOnce",
    "EvidenceKind",
    "ModelBackend",
    "Releases",
    "Repairs",
    "ScoreOutput",
    "Session",
    "SessionT",
    "SetsThreads",
    "StepCall",
    "StepOutput",
    "StreamsRest",
]

EvidenceKind = Literal["judge", "likelihood"]


class ComputedOnce:
    """A ``Capabilities`` field given as its value or as a function that computes it on first
    read (then kept). Why: a model's identity hashes some of its weights, which takes seconds for
    a large model, and only a request with the trajectory cache on ever reads it; declaring what
    a backend can do must stay as cheap as building the backend."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> ComputedOnce: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> str: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> str | ComputedOnce:
        if obj is None:  # no class-level default: the field is required
            raise AttributeError(self.name)
        value = obj.__dict__[self.name]
        if callable(value):
            value = obj.__dict__[self.name] = value()
        return str(value)

    def __set__(self, obj: object, value: str | Callable[[], str]) -> None:
        obj.__dict__[self.name] = value  # also on a frozen dataclass: set once, by its __init__


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do and how it is reached: every backend declares one as its
    ``capabilities`` attribute (``backends.registry.capabilities_of`` reads it); the engine and
    the Reasoner ask this value, never the backend object.

    * ``identity``: a stable id of its weights, for trajectory-cache keys (a string, or a
      function computing it on first read: ``ComputedOnce``);
    * ``device``: where it computes (``cpu``, ``cuda``, ``cuda:1``; ``remote`` for a server);
    * ``concurrent``: its operations are coroutines whose calls from many requests run at once
      (``AsyncModelBackend``: a serving engine batches them); False: blocking calls, one at a
      time behind the model's lock, in worker threads;
    * ``repair``: it can start a step from a given text (``begin_step``, ``Repairs``), so a
      rejected step is repaired rather than rewritten;
    * ``evidence``: the TBVM modes its ``score`` supports;
    * ``cpu_threads``: this machine's cores its model computes on (intra-op threads of its calls;
      a server on loopback counts them too; 0: not on this CPU), shared out between the models
      (``engine.threads``); with ``sets_threads`` it takes a per-call count (``use_threads``,
      ``SetsThreads``);
    * ``recommended_verification``: its model folder's recommended TBVM settings
      (``dreamr.json`` "verification", ``backends.settings``; empty: none);
    * ``recommended_schedule``: the speculation schedule measured where this model is served
      (``dreamr.json`` "schedule": ``SchedulingConfig.schedule``'s rows; empty: none);
    * ``task``: the task its model was trained on (``dreamr.json`` "task"; None: unknown);
    * ``release``: how its resources are freed when its owner closes (``none``; ``sync``:
      ``shutdown()``, e.g. a child process; ``async``: ``await aclose()``, e.g. connections);
    * ``abandonable``: a blocking call whose caller is cancelled may be left running: the
      backend settles it by itself (``backends.call_context``), and a call made meanwhile waits
      for that or fails, never running beside it. False: a cancelled caller waits for its call
      (a thread cannot be stopped, and a model in this process runs one call at a time);
    * ``batches``: the most ``generate_step`` calls (rows) its ``generate_batch`` decodes together,
      one forward per token for all of them (``Batches``); 0: it cannot batch. The engine gathers
      the steps that wait for a blocking model into one such call (``engine.runner``);
    * ``streams_rest``: it writes the rest of an answer in one call (``generate_rest``,
      ``StreamsRest``), yielding the steps as they come: a served model then costs one request
      for all of them instead of one per step. False: the engine asks for one step at a time.
    """

    identity: ComputedOnce = ComputedOnce()
    device: str = "cpu"
    concurrent: bool = False
    repair: bool = False
    evidence: frozenset[EvidenceKind] = frozenset({"judge", "likelihood"})
    cpu_threads: int = 0
    sets_threads: bool = False
    recommended_verification: Mapping[str, Any] = field(default_factory=dict)
    recommended_schedule: tuple[Mapping[str, Any], ...] = ()
    task: str | None = None
    release: Literal["none", "sync", "async"] = "none"
    abandonable: bool = False
    batches: int = 0
    streams_rest: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def but(self, **changes: Any) -> Capabilities:
        """A copy with ``changes``; an identity not computed yet stays so (``dataclasses.replace``
        would compute it)."""
        return replace(self, **{"identity": self.__dict__["identity"], **changes})


class Repairs(Protocol):
    """The operation ``Capabilities.repair`` announces (a coroutine on an async backend)."""

    def begin_step(self, session: Any, text: str, *, proposal: str = "") -> Any: ...


class StreamsRest(Protocol):
    """The operation ``Capabilities.streams_rest`` announces (on an async backend): up to
    ``max_steps`` steps, each as ``generate_step`` would write it, yielded as they are written
    and in the session by then; leaving early stops the writing."""

    def generate_rest(
        self, session: Any, *, max_tokens: int, stop: str, max_steps: int, temperature: float = 0.0
    ) -> AsyncIterator[StepOutput]: ...


class Batches(Protocol):
    """The operation ``Capabilities.batches`` announces: several ``generate_step`` calls, on
    different sessions, decoded together; each output and each session afterwards is exactly what
    ``generate_step`` alone would have given (greedy decoding; a backend may run unusual rows alone)."""

    def generate_batch(self, calls: list[StepCall]) -> list[StepOutput]: ...


class SetsThreads(Protocol):
    """The operation ``Capabilities.sets_threads`` announces: run this thread's next calls on
    ``n`` intra-op threads (called in the worker thread that makes them)."""

    def use_threads(self, n: int) -> None: ...


class Releases(Protocol):
    """``Capabilities.release == "sync"``: free what the backend holds outside this process."""

    def shutdown(self) -> None: ...


class AsyncReleases(Protocol):
    """``Capabilities.release == "async"``: close what it holds (connections) on their loop."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class StepOutput:
    """What one ``generate_step`` call produced.

    ``text`` is the whole step so far (without the delimiter). ``done`` is False only when the
    call's token ``budget`` ran out mid-step; calling again continues the same step.
    """

    text: str
    done: bool
    eos: bool = False
    new_tokens: int = 0
    forwards: int = 0
    proposed: int = 0  # of ``new_tokens``, how many a proposal guessed and one forward verified


@dataclass(frozen=True)
class StepCall:
    """The arguments of one ``generate_step`` call, as a row of ``generate_batch``."""

    session: Any
    max_tokens: int
    stop: str
    temperature: float = 0.0
    budget: int | None = None


@dataclass(frozen=True)
class ScoreOutput:
    """Evidence about a candidate step from ONE forward of the judging model.

    The candidate and delimiter tokens (``n_tokens``) stay in the session's cache, as if the
    model had written them; the judge suffix does not. Roll back ``n_tokens`` to reject.
    """

    p_pos: float
    p_neg: float
    token_logprobs: list[float] = field(default_factory=list)  # log p(candidate token | prefix)
    n_tokens: int = 0
    forwards: int = 1
    # the longest start of the candidate whose every token is the judging model's greedy choice
    # (None: this backend cannot tell). A rejected step is repaired from it: the model continues
    # its own step from there (``begin_step``), which is exactly the step it would have written.
    agreed: str | None = None


@runtime_checkable
class Session(Protocol):
    """A request's state on one model: the prompt, the steps appended so far, their KV cache."""

    @property
    def length(self) -> int:
        """Tokens in the cache (characters for a client-side session: the backend's rollback unit)."""
        ...

    @property
    def finished(self) -> bool:
        """The model emitted end-of-sequence."""
        ...


SessionT = TypeVar("SessionT", bound=Session)


@runtime_checkable
class ModelBackend(Protocol[SessionT]):
    """A model that serves per-request sessions of type ``SessionT``."""

    name: str
    judge: JudgeTemplate

    @property
    def capabilities(self) -> Capabilities:
        """What it can do and how it is reached (read for every request: it may change, e.g.
        once a child process has started)."""
        ...

    def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> SessionT:
        """Prefill image + question once; the session owns its cache."""
        ...

    def generate_step(
        self,
        session: SessionT,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
    ) -> StepOutput:
        """Decode the next reasoning step (or continue a partial one) until ``stop``, EOS or
        ``max_tokens`` step tokens; at most ``budget`` new tokens in this call."""
        ...

    def score(self, session: SessionT, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput:
        """Append ``text + stop`` and, when ``judge`` is given, read the verdict-token
        probabilities after the judge suffix, all in one forward."""
        ...

    def append(self, session: SessionT, text: str, *, stop: str) -> int:
        """Append a step written elsewhere (``text + stop``); returns tokens appended."""
        ...

    def rollback(self, session: SessionT, n_tokens: int) -> None:
        """Drop the last ``n_tokens`` from the cache (and any partial step)."""
        ...

    def fork(self, session: SessionT) -> SessionT:
        """An independent copy of the session (same prefix, own cache)."""
        ...

    def close(self, session: SessionT) -> None:
        """Free the session's memory."""
        ...


@runtime_checkable
class AsyncModelBackend(Protocol[SessionT]):
    """A model served elsewhere: ``ModelBackend``'s operations as coroutines.

    Calls may run concurrently (on different sessions); cancelling one aborts its work on the
    server. ``budget`` is accepted for symmetry and ignored: a cancellable call needs no
    chunking. ``close`` stays synchronous and cheap (cleanup paths call it on the event loop).
    """

    name: str
    judge: JudgeTemplate

    @property
    def capabilities(self) -> Capabilities: ...

    async def open_session(self, image: Image.Image, question: str, *, seed: int = 0) -> SessionT: ...

    async def generate_step(
        self,
        session: SessionT,
        *,
        max_tokens: int,
        stop: str,
        temperature: float = 0.0,
        budget: int | None = None,
    ) -> StepOutput: ...

    async def score(self, session: SessionT, text: str, *, stop: str, judge: JudgeTemplate | None) -> ScoreOutput: ...

    async def append(self, session: SessionT, text: str, *, stop: str) -> int: ...

    async def rollback(self, session: SessionT, n_tokens: int) -> None: ...

    async def fork(self, session: SessionT) -> SessionT: ...

    async def begin_step(self, session: SessionT, text: str, *, proposal: str = "") -> int:
        """Start the next step with ``text`` (no delimiter); ``generate_step`` continues it and
        returns the whole step, ``text`` included. Used to repair a rejected step. ``proposal``
        guesses the rest (the rejected step's rest); a backend may verify it several tokens per
        forward, keeping only its own greedy choices, or ignore it. Returns ``text``'s tokens."""
        ...

    def close(self, session: SessionT) -> None: ...
