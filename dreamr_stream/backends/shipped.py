"""Where the shipped demo models live inside the package, and which task each was trained on.

A shipped model is a folder under ``weights/`` with a ``config.json``; its ``dreamr.json`` names
its task (``"task"``, written by ``zoo.export``; a folder that names none was exported before
tasks had names, so it is the grid's). A task's folders share a prefix (``task_prefix``): none for
the default task, whose models came first (``target``, ``target-judge``, ``draft-<name>``), and
``<task>-`` for every other (``charts-target``, ``charts-draft-sapo``), so the folders of every
task sit side by side and a task's name alone finds its models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dreamr_stream.backends.settings import read_settings
from dreamr_stream.errors import ModelLoadError
from dreamr_stream.tasks import DEFAULT_TASK

__all__ = [
    "WEIGHTS",
    "DemoPaths",
    "default_draft",
    "demo_paths",
    "model_task",
    "shipped_drafts",
    "shipped_models",
    "shipped_tasks",
    "task_prefix",
]

WEIGHTS = Path(__file__).parent.parent / "zoo" / "weights"  # package data beside the pipeline that made them


@dataclass(frozen=True)
class DemoPaths:
    target: Path
    draft: Path


def model_task(folder: Path) -> str:
    """The task a shipped model folder's ``dreamr.json`` says it was trained on (none said: the
    default task's, whose models predate the field)."""
    return read_settings(folder).task or DEFAULT_TASK


def shipped_models(task: str | None = None) -> list[str]:
    """The shipped models' folder names (under ``WEIGHTS``), of ``task`` only if given."""
    models = sorted(p.name for p in WEIGHTS.glob("*") if (p / "config.json").exists())
    return [m for m in models if task is None or model_task(WEIGHTS / m) == task]


def task_prefix(task: str) -> str:
    """What the names of ``task``'s shipped folders start with: nothing for the default task."""
    return "" if task == DEFAULT_TASK else f"{task}-"


def shipped_tasks() -> list[str]:
    """The tasks with a shipped target, the default task first."""
    tasks = {model_task(WEIGHTS / m) for m in shipped_models()}
    found = [t for t in tasks if (WEIGHTS / f"{task_prefix(t)}target" / "config.json").exists()]
    return sorted(found, key=lambda t: (t != DEFAULT_TASK, t))


def shipped_drafts(task: str = DEFAULT_TASK) -> list[str]:
    """The names of ``task``'s shipped drafts (``[<task>-]draft-<name>`` folders)."""
    head = f"{task_prefix(task)}draft-"
    return [m.removeprefix(head) for m in shipped_models(task) if m.startswith(head)]


def default_draft(task: str = DEFAULT_TASK) -> str:
    """The demo's draft: the SAPO draft when it ships (it is accepted more often), else SFT."""
    return "sapo" if "sapo" in shipped_drafts(task) else "sft"


def demo_paths(draft: str | None = None, task: str = DEFAULT_TASK) -> DemoPaths:
    """Folders of ``task``'s shipped target and the named draft (``sft`` or ``sapo``; default: see
    ``default_draft``)."""
    draft = draft or default_draft(task)
    mine = shipped_models(task)
    if not mine:
        tasks = sorted({model_task(WEIGHTS / m) for m in shipped_models()})
        raise ModelLoadError(f"no shipped demo models for task {task!r} (shipped: {', '.join(tasks) or 'none'})")
    target = WEIGHTS / f"{task_prefix(task)}target"
    draft_dir = WEIGHTS / f"{task_prefix(task)}draft-{draft}"
    for folder in (target, draft_dir):
        if folder.name not in mine:
            raise ModelLoadError(
                f"demo model missing at {folder} for task {task!r}; shipped drafts: "
                f"{shipped_drafts(task) or 'none'} (reinstall the package, or train one with `dreamr zoo train`)"
            )
    return DemoPaths(target=target, draft=draft_dir)
