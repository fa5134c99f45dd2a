"""Helpers for the LangChain adapter tests: a scripted reasoner (fast) and the demo one (slow)."""

from __future__ import annotations

import base64
import importlib.util
import io
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from dreamr_stream import Reasoner, ReasonerConfig
from dreamr_stream.backends.fake import ScriptedBackend
from dreamr_stream.config import CacheConfig

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PUZZLE = EXAMPLES / "images" / "puzzle-1.png"
TARGET = ["read row one", "read row two", "count them up", "Answer: 4"]
DRAFT = ["read row one", "read row 2 wrongly", "count them up", "Answer: 4"]
#: Requests compare equal only without the trajectory cache (a repeat would reuse cached steps).
NO_CACHE = ReasonerConfig(cache=CacheConfig(enabled=False))


def png_bytes(size: int = 32, colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_reasoner(*, delay: float = 0.0, **target_kw: Any) -> Reasoner:
    """The scripted pair: step 1 is a rejected draft replaced by the target, the rest are accepted."""
    return Reasoner(
        ScriptedBackend(TARGET, name="target", token_delay_s=delay, **target_kw),
        ScriptedBackend(DRAFT, name="draft", token_delay_s=delay / 4),
        config=NO_CACHE,
    )


def assert_closed(reasoner: Reasoner) -> None:
    """The adapter closed the core's request (the core has cancelled and awaited its task).

    Backends may still finish one model call: the core's cleanup cancels its request task with a
    native ``task.cancel()``, which interrupts the await on a running model thread (reported as a
    core issue); use :func:`wait_idle` for "nothing left running".
    """
    assert reasoner.active_requests == 0


def wait_idle(reasoner: Reasoner, timeout_s: float = 2.0) -> None:
    """Block until no model call of any request is running, then check everything is released."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not _idle(reasoner):
        time.sleep(0.005)
    assert_idle(reasoner)


def _idle(reasoner: Reasoner) -> bool:
    backends = [r.backend for r in (reasoner.target, reasoner.draft) if r is not None]
    return reasoner.active_requests == 0 and all(
        isinstance(b, ScriptedBackend) and b.active_calls == 0 and b.open_sessions == 0 for b in backends
    )


def assert_idle(reasoner: Reasoner) -> None:
    """Invariant 4 seen from the adapter: no request, model call or session is left behind."""
    assert reasoner.active_requests == 0
    assert reasoner.in_flight == 0
    for runner in (reasoner.target, reasoner.draft):
        assert runner is not None
        backend = runner.backend
        assert isinstance(backend, ScriptedBackend)
        assert backend.active_calls == 0 and backend.open_sessions == 0


_demo: list[Reasoner] = []


def shared_demo() -> Reasoner:
    """One demo reasoner per test session (the standard suites need it outside fixtures)."""
    if not _demo:
        _demo.append(Reasoner.demo())
    return _demo[0]


def load_agent_example() -> ModuleType:
    """``examples/langchain_agent.py`` as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("dreamr_langchain_agent_example", EXAMPLES / "langchain_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
