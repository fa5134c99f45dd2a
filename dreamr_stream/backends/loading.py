"""Loading the two models a Reasoner runs: local folders, served models, the shipped demo.

``load_pair`` opens a target and an optional draft through the backend registry (``open``
decides what a folder, a URL or an object is) and decides how a local draft runs: in this
process, in a process of its own (``ProcessBackend``: its calls then overlap the target's instead
of waiting for this process's GIL), or in its own process served meanwhile from a copy loaded
here (a stand-in). ``demo_sources`` says where the shipped demo models are (the only knowledge
of ``zoo.shipped`` below the application). ``Reasoner.from_pretrained`` is ``load_pair`` plus a
Reasoner that owns what it loaded, and ``Reasoner.demo`` is ``from_pretrained`` on ``demo_sources``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dreamr_stream.backends import registry
from dreamr_stream.backends.registry import Backend, is_url
from dreamr_stream.config import ReasonerConfig, ScheduleRow, SchedulingConfig, VerificationConfig
from dreamr_stream.tasks import DEFAULT_TASK

if TYPE_CHECKING:
    from dreamr_stream.backends.base import ModelBackend
    from dreamr_stream.backends.process import ProcessBackend

__all__ = ["DemoSources", "LoadedModels", "demo_sources", "load_pair", "resolve_device"]


@dataclass(frozen=True)
class LoadedModels:
    """A target and an optional draft, loaded; whoever holds them releases them
    (``registry.shutdown``/``aclose``; a Reasoner built with ``owns_backends`` does)."""

    target: Backend
    draft: Backend | None = None

    def recommended_config(self) -> ReasonerConfig | None:
        """The verification (and speculation schedule) the target's model folder recommends
        (``dreamr.json``), as a config; None when it recommends none."""
        caps = registry.capabilities_of(self.target)
        if not caps.recommended_verification and not caps.recommended_schedule:
            return None
        groups: dict[str, Any] = {}
        if caps.recommended_verification:
            groups["verification"] = VerificationConfig.recommended(caps.recommended_verification)
        if caps.recommended_schedule:
            groups["scheduling"] = SchedulingConfig(schedule=tuple(ScheduleRow(**r) for r in caps.recommended_schedule))
        return ReasonerConfig(**groups)


def resolve_device(device: str) -> str:
    """``device`` with ``auto`` resolved; imports torch only for ``auto`` (a child process can
    start before this process's heavy imports)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pair(
    target: str | Path,
    draft: str | Path | None = None,
    *,
    device: str = "auto",
    draft_process: bool | None = None,
    draft_stand_in: bool = False,
    settings_from: str | Path | None = None,
) -> LoadedModels:
    """The target and draft that ``Reasoner.from_pretrained`` runs (its docstring says what
    each argument does). A draft process that was started is stopped when the target fails
    to load."""
    dev = resolve_device(device)
    local_draft = draft is not None and not is_url(draft)
    separate = local_draft and (draft_process if draft_process is not None else dev.startswith("cpu"))
    d: Backend | None = None
    starting: ProcessBackend | None = None
    if draft is not None and is_url(draft):
        d = registry.open(draft, name="draft")
    elif draft is not None and separate and not draft_stand_in:
        # started before torch and transformers are imported here: the child imports them
        # beside this process, and loads while the target loads
        starting = cast("ProcessBackend", registry.open(draft, name="draft", device=dev, process=True, wait=False))
        d = starting
    try:
        t = registry.open(target, name="target", device=dev, settings_from=settings_from)
        if draft is not None and separate and draft_stand_in:
            d = _with_stand_in(draft, dev)
        elif starting is not None:
            starting.ready()
    except BaseException:
        if starting is not None:  # no orphan child when the target fails to load
            starting.shutdown()
        raise
    if draft is not None and d is None:
        d = registry.open(draft, name="draft", device=dev)
    return LoadedModels(t, d)


def _with_stand_in(draft: str | Path, device: str) -> Backend:
    """The draft in its own process, served from a copy loaded here until that process is ready.

    The process starts after this one has loaded, not beside it: with the stand-in nothing waits
    for it, and on a busy machine two imports of torch and transformers at once took 13 s each
    against 7 s alone, so starting it earlier delayed the first request by the child's import.
    """
    stand_in = registry.open(draft, name="draft", device=device)
    backend = cast("ProcessBackend", registry.open(draft, name="draft", device=device, process=True, wait=False))
    backend.use_stand_in(cast("ModelBackend[Any]", stand_in))
    return backend


@dataclass(frozen=True)
class DemoSources:
    """Where the shipped demo models are, or served copies of them: ``load_pair``'s arguments."""

    target: str | Path
    draft: str | Path
    settings_from: Path  # the shipped target folder: its dreamr.json applies to a served copy


def demo_sources(
    draft: str | None = None,
    *,
    task: str = DEFAULT_TASK,
    target_url: str | None = None,
    draft_url: str | None = None,
) -> DemoSources:
    """The shipped demo models that ``Reasoner.demo`` runs (its docstring says what each
    argument does)."""
    from dreamr_stream.backends.shipped import demo_paths

    paths = demo_paths(draft, task)
    return DemoSources(target=target_url or paths.target, draft=draft_url or paths.draft, settings_from=paths.target)
