"""Where the shipped demo models live inside the package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dreamr_stream.errors import ModelLoadError

__all__ = ["WEIGHTS", "DemoPaths", "default_draft", "demo_paths", "shipped_drafts"]

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class DemoPaths:
    target: Path
    draft: Path


def shipped_drafts() -> list[str]:
    return sorted(p.name.removeprefix("draft-") for p in WEIGHTS.glob("draft-*") if (p / "config.json").exists())


def default_draft() -> str:
    """The demo's draft: the SAPO draft when it ships (it is accepted more often), else SFT."""
    return "sapo" if "sapo" in shipped_drafts() else "sft"


def demo_paths(draft: str | None = None) -> DemoPaths:
    """Folders of the shipped target and the named draft (``sft`` or ``sapo``; default: see
    ``default_draft``)."""
    draft = draft or default_draft()
    target = WEIGHTS / "target"
    draft_dir = WEIGHTS / f"draft-{draft}"
    for folder in (target, draft_dir):
        if not (folder / "config.json").exists():
            raise ModelLoadError(
                f"demo model missing at {folder}; shipped drafts: {shipped_drafts() or 'none'} "
                "(reinstall the package, or train one with `dreamr zoo train`)"
            )
    return DemoPaths(target=target, draft=draft_dir)
