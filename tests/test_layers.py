"""The house's layers, read from the source: who imports whom, and that every arrow points down.

application (``dreamr_app``) -> integrations (``integrations/dreamr_*``) -> core (``dreamr_stream``);
inside the core: reasoner -> engine -> backends / verify -> types, errors, config, events.

The graph holds every import of the project's modules: at module level, inside functions, under
``TYPE_CHECKING`` (a type is a dependency too, and a circle through one is still a circle for a
reader), and ``importlib.import_module("a.literal")``. An import names the module it reaches
(``from pkg import sub`` reaches ``pkg.sub`` when that is a module, else ``pkg`` itself); a
package's ``__init__`` is a module of its own, reached only when it is named. Every failure names
the offending import as ``file:line``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "dreamr_stream"
APP = "dreamr_app"
INTEGRATIONS = tuple(sorted(p.name for p in (ROOT / "integrations").iterdir() if (p / "__init__.py").exists()))
# the core's bottom: values, errors, configuration and events, which every layer above may use
BOTTOM = ("types", "errors", "config", "events")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module it reaches
    where: str  # file:line of the import

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def _sources() -> dict[str, Path]:
    """Every module of the project, by its dotted name."""
    roots = [ROOT / CORE, ROOT / APP, *(ROOT / "integrations" / name for name in INTEGRATIONS)]
    modules = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root.parent).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` reaches: itself, else its nearest enclosing module (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _targets(node: ast.AST, module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """The project modules one AST node imports (none for a node that is no import)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importing module's package, up level - 1
            package = _package_of(module, path).split(".")
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if called == "import_module" and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
    found = (_known(name, modules) for name in names)
    return list(dict.fromkeys(t for t in found if t is not None and t != module))


def import_graph() -> list[Import]:
    modules = _sources()
    edges = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            edges += [Import(module, target, where) for target in _targets(node, module, path, modules)]
    return edges


def _within(module: str, *layers: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def find_cycle(edges: list[Import]) -> list[Import] | None:
    """One import circle, as its imports in order; None when the graph has none."""
    out: dict[str, list[Import]] = {}
    for edge in edges:
        out.setdefault(edge.source, []).append(edge)
    finished: set[str] = set()
    stack: list[str] = []  # the modules on the current path; path[i] leads from stack[i] to stack[i + 1]
    path: list[Import] = []

    def visit(module: str) -> list[Import] | None:
        stack.append(module)
        for edge in out.get(module, []):
            if edge.target in stack:  # back to a module on the path: the circle runs from there
                return [*path[stack.index(edge.target) :], edge]
            if edge.target not in finished:
                path.append(edge)
                if (cycle := visit(edge.target)) is not None:
                    return cycle
                path.pop()
        stack.pop()
        finished.add(module)
        return None

    for module in sorted(out):
        if module not in finished and (cycle := visit(module)) is not None:
            return cycle
    return None


def _report(offenders: list[Import]) -> str:
    return "\n".join(map(str, offenders))


# ---------------------------------------------------------------------------------- the rules
def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "an import circle:\n" + _report(cycle or [])


def test_the_core_imports_no_integration_and_not_the_application() -> None:
    above = (APP, *INTEGRATIONS)
    offenders = [e for e in import_graph() if _within(e.source, CORE) and _within(e.target, *above)]
    assert offenders == [], "the core imports a layer above it:\n" + _report(offenders)


def test_integrations_never_import_the_application() -> None:
    offenders = [e for e in import_graph() if _within(e.source, *INTEGRATIONS) and _within(e.target, APP)]
    assert offenders == [], "an integration imports the application:\n" + _report(offenders)


def _core(*names: str) -> tuple[str, ...]:
    return tuple(f"{CORE}.{name}" for name in names)


# (importers, what they must never import): inside the core, arrows point down
CORE_RULES = [
    (_core("engine"), _core("reasoner", "zoo", "sapo", "bench")),
    (_core("backends", "verify"), _core("engine", "reasoner", "zoo", "sapo", "bench")),
    # a task is values and pictures: what uses it (the engine, the zoo, the bench) sits above it
    (_core("tasks"), _core("backends", "verify", "engine", "reasoner", "zoo", "sapo", "bench")),
]


def test_inside_the_core_the_layers_point_down() -> None:
    edges = import_graph()
    offenders = [
        e
        for importers, above in CORE_RULES
        for e in edges
        if _within(e.source, *importers) and _within(e.target, *above)
    ]
    # the bottom imports only the bottom: not the package's facade (``dreamr_stream``), which
    # re-exports the reasoner, nor any layer above
    bottom = _core(*BOTTOM)
    offenders += [e for e in edges if _within(e.source, *bottom) and not _within(e.target, *bottom)]
    assert offenders == [], "an import points up a layer of the core:\n" + _report(offenders)


# ---------------------------------------------------------------------------------- the reader itself
def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    modules = {
        "pkg": tmp_path / "pkg" / "__init__.py",
        "pkg.a": tmp_path / "pkg" / "a.py",
        "pkg.b": tmp_path / "pkg" / "b.py",
        "pkg.sub": tmp_path / "pkg" / "sub" / "__init__.py",
        "pkg.sub.c": tmp_path / "pkg" / "sub" / "c.py",
    }
    source = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.b import Thing\n"
        "def f():\n"
        "    from . import a\n"
        "    from .c import name\n"
        "    from .. import b\n"
        "    import importlib\n"
        "    return importlib.import_module('pkg.sub')\n"
        "from pkg import Facade\n"
    )
    found = [
        target
        for node in ast.walk(ast.parse(source))
        for target in _targets(node, "pkg.sub.c", modules["pkg.sub.c"], modules)
    ]
    assert sorted(found) == ["pkg", "pkg.b", "pkg.b", "pkg.sub", "pkg.sub"]
    # ``from . import a`` in pkg.sub.c is pkg.sub (no module pkg.sub.a); ``from .c`` is itself


def test_the_cycle_finder_reports_the_circle_in_order() -> None:
    edges = [Import("a", "b", "a.py:1"), Import("b", "c", "b.py:2"), Import("c", "a", "c.py:3"), Import("c", "d", "")]
    cycle = find_cycle(edges)
    assert cycle is not None and [e.where for e in cycle] == ["a.py:1", "b.py:2", "c.py:3"]
    assert find_cycle(edges[:2] + edges[3:]) is None
    assert find_cycle([Import("x", "y", "x.py:1"), Import("y", "x", "y.py:9")]) is not None
