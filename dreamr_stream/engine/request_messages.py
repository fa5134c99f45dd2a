"""What FPSR's request policy and its executor tell each other (``engine.request_policy``).

Observations flow in: what happened (the sessions opened, the cache answered, a replayed step
was judged, the draft failed, the load changed, an epoch's lanes stopped, the target wrote a
step alone). Actions flow out: what to do next (open, look up, replay, start an epoch, permit
the draft a step, go alone, resync, write alone, store, finish). The epoch's own messages
(``engine.policy``) pass through both unions. All are plain frozen values, so that a test can
build, compare and enumerate them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreamr_stream.engine import policy as P

__all__ = [
    "AcceptCached",
    "Action",
    "AloneWrote",
    "CacheHit",
    "CacheMiss",
    "CatchUpDraft",
    "DraftFailed",
    "DraftSynced",
    "EpochEnded",
    "Finish",
    "GoAlone",
    "LookUpCache",
    "Observation",
    "OpenSessions",
    "Opened",
    "PermitDraft",
    "RejectCached",
    "Replan",
    "ReplayJudged",
    "ReplayStep",
    "ResyncDraft",
    "StartEpoch",
    "Store",
    "WriteAlone",
]


# ---------------------------------------------------------------------- observations
@dataclass(frozen=True)
class Replan:
    """The speculation schedule's choice now (``engine.schedule``): the draft may run
    ``lookahead`` steps ahead from the next epoch on; 0: the target alone, for ``reason``."""

    lookahead: int
    reason: str = ""


@dataclass(frozen=True)
class Opened:
    """The sessions are open; ``draft``: the draft's too."""

    draft: bool


@dataclass(frozen=True)
class CacheHit:
    """The store holds this request's trajectory: ``steps`` cached steps."""

    steps: int


@dataclass(frozen=True)
class CacheMiss:
    """The store holds no trajectory for this request (or did not answer in time)."""


@dataclass(frozen=True)
class ReplayJudged:
    """Cached step ``index`` was judged (``final``: it ends the reasoning)."""

    index: int
    accepted: bool
    final: bool = False


@dataclass(frozen=True)
class DraftFailed:
    """A draft call failed (opening, drafting, catching up, resyncing): ``error`` says how."""

    error: str


@dataclass(frozen=True)
class DraftSynced:
    """The draft holds the verified prefix again (after ``CatchUpDraft`` or ``ResyncDraft``)."""


@dataclass(frozen=True)
class EpochEnded:
    """The epoch's lanes are stopped and awaited; its fallback forks are freed."""


@dataclass(frozen=True)
class AloneWrote:
    """The target alone wrote ``steps`` steps from step ``index`` on (the rest of the request,
    or as much as one call wrote); ``final``: the last of them ends the reasoning."""

    index: int
    final: bool = False
    steps: int = 1


Observation = (
    Replan | Opened | CacheHit | CacheMiss | ReplayJudged | DraftFailed | DraftSynced | EpochEnded | AloneWrote
) | P.Observation


# ---------------------------------------------------------------------- actions
@dataclass(frozen=True)
class OpenSessions:
    """Open the target's session, and the draft's when ``draft`` (outcome: ``Opened``)."""

    draft: bool


@dataclass(frozen=True)
class LookUpCache:
    """Look this request's trajectory up (outcome: ``CacheHit`` or ``CacheMiss``)."""


@dataclass(frozen=True)
class ReplayStep:
    """Judge cached step ``index`` on the target, or append it if ``trust`` (outcome: ``ReplayJudged``)."""

    index: int
    trust: bool


@dataclass(frozen=True)
class AcceptCached:
    """Cached step ``index`` is verified: yield it."""

    index: int


@dataclass(frozen=True)
class RejectCached:
    """Cached step ``index`` was rejected: tell the listeners, take its tokens off the target."""

    index: int


@dataclass(frozen=True)
class CatchUpDraft:
    """Append the first ``steps`` verified steps to the draft (outcome: ``DraftSynced``)."""

    steps: int


@dataclass(frozen=True)
class StartEpoch:
    """Start an epoch's lanes from the verified prefix of ``start`` steps."""

    start: int


@dataclass(frozen=True)
class PermitDraft:
    """The draft lane may write step ``index``."""

    index: int


@dataclass(frozen=True)
class GoAlone:
    """The target writes the rest alone, from its next step; ``error``: the draft's failure."""

    reason: str
    error: str | None = None


@dataclass(frozen=True)
class ResyncDraft:
    """Roll the draft back to step ``index`` and append the target's step (outcome: ``DraftSynced``)."""

    index: int


@dataclass(frozen=True)
class WriteAlone:
    """The target writes alone on its session from step ``index`` on, to the end of the
    request (outcome: ``AloneWrote``; one call for all of them on a backend that streams the
    rest, ``Capabilities.streams_rest``)."""

    index: int


@dataclass(frozen=True)
class Store:
    """Keep the verified trajectory (its last step is final) for the next identical request."""


@dataclass(frozen=True)
class Finish:
    """The request is over: nothing follows."""


Action = (
    OpenSessions
    | LookUpCache
    | ReplayStep
    | AcceptCached
    | RejectCached
    | CatchUpDraft
    | StartEpoch
    | PermitDraft
    | GoAlone
    | ResyncDraft
    | WriteAlone
    | Store
    | Finish
) | P.Action
