"""No module imports another module's private names: what modules share is public (named
without a leading underscore), so a module's private names can change without a search through
the tree. A private module (``dreamr_langchain._bridge``) is shared within its own package only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("dreamr_stream", "dreamr_app", "integrations") for p in (ROOT / d).rglob("*.py"))


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[1:] if parts[0] == "integrations" else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")  # ``__version__`` is public


def private_imports(source: str, here: str) -> list[str]:
    """What module ``here`` (its source) imports of another module's privates: ``from M import
    _x``, and private modules of another package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.module is None or not node.module.startswith("dreamr_"):
            continue
        if node.module != here:
            found += [f"{node.module}.{a.name}" for a in node.names if _private(a.name)]
        parts = node.module.split(".")
        first_private = next((i for i, part in enumerate(parts) if part.startswith("_")), None)
        if first_private is not None and not here.startswith(".".join(parts[:first_private]) + "."):
            found.append(node.module)
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = {
        str(p.relative_to(ROOT)): names for p in SOURCES if (names := private_imports(p.read_text(), _module_of(p)))
    }
    assert offenders == {}


def test_the_check_finds_private_imports() -> None:
    source = (
        "from dreamr_app.common import _hidden, load_reasoner\n"
        "from dreamr_langchain._bridge import iterate_sync\n"
        "from dreamr_stream.backends._process_child import SESSION_OPS\n"
    )
    assert private_imports(source, "dreamr_app.daemon.server") == [
        "dreamr_app.common._hidden",
        "dreamr_langchain._bridge",
        "dreamr_stream.backends._process_child",
    ]
    # within its package a private module is shared; a module's own names are its own
    assert private_imports(source, "dreamr_app.common") == [
        "dreamr_langchain._bridge",
        "dreamr_stream.backends._process_child",
    ]
    assert private_imports("from dreamr_stream import __version__\n", "dreamr_app.daemon.files") == []
    assert private_imports(source.splitlines()[2], "dreamr_stream.backends.process") == []
