"""Backends found and described in one place.

``capabilities_of(backend)`` is the one place that inspects a backend object; the engine and
the Reasoner read the typed ``Capabilities`` it returns.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from dreamr_stream.backends.base import Capabilities

__all__ = ["aclose", "capabilities_of", "shutdown"]


def capabilities_of(backend: Any) -> Capabilities:
    """The backend's declared ``capabilities``, else what its attributes show."""
    declared = getattr(backend, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    device = getattr(backend, "device", "cpu")
    device_name = str(getattr(device, "type", device))
    release: Literal["none", "sync", "async"] = (
        "async" if hasattr(backend, "aclose") else "sync" if hasattr(backend, "shutdown") else "none"
    )
    return Capabilities(
        identity=str(getattr(backend, "identity", backend.name)),
        device=device_name,
        concurrent=inspect.iscoroutinefunction(backend.generate_step),
        repair=hasattr(backend, "begin_step"),
        cpu_threads=int(getattr(backend, "cpu_threads", 0)),
        sets_threads=hasattr(backend, "use_threads"),
        recommended_verification=dict(getattr(backend, "recommended_verification", {}) or {}),
        release=release,
    )


def shutdown(backend: Any) -> None:
    """Free what a backend holds outside this process's memory (a child process), if anything."""
    if capabilities_of(backend).release == "sync":
        backend.shutdown()


async def aclose(backend: Any) -> None:
    """Close what an async backend holds (its connections), if anything; on their event loop."""
    if capabilities_of(backend).release == "async":
        await backend.aclose()
