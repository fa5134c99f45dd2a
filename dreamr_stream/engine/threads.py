"""Share the CPU's intra-op threads between the model calls that run at the same time.

FPSR overlaps a draft call with a target call. On a CPU each call is a torch op sequence that
spreads over the intra-op (OpenMP) thread team, by default one thread per core; two such calls
at once put two full teams on the cores, and on two cores we measured each call 2-3x slower
than alone, which ate the overlap. A call alone should keep every core, though: the
target-only and sequential schedules never overlap, and FPSR's lanes idle in turns.

So each call asks, as it starts, how many calls are running (itself included) and takes its
share, ``max(1, total // running)``. OpenMP's thread count is a per-thread setting, so the
worker thread that runs the call sets its own (``CpuThreads.apply``) without touching the
others. A call that started alone keeps its threads until it ends, so two calls can briefly
overlap with more threads than cores; calls are short (one step chunk, one scoring forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["CpuThreaded", "ThreadShare"]


@runtime_checkable
class CpuThreaded(Protocol):
    """A backend whose calls run on the CPU's intra-op threads (``TransformersBackend``)."""

    @property
    def cpu_threads(self) -> int:
        """Threads its calls may use; 0 when it does not run on the CPU."""
        ...

    def use_threads(self, n: int) -> None:
        """Set the calling thread's intra-op thread count."""
        ...


class ThreadShare:
    """The intra-op threads of ``total`` cores, split between the calls running at once.

    ``claim`` and ``release`` run on the event loop (one thread), so a plain counter is enough;
    ``apply(n)`` runs in the call's worker thread and sets that thread's intra-op threads.
    """

    def __init__(self, total: int, apply: Callable[[int], None]) -> None:
        if total < 1:
            raise ValueError(f"total threads must be >= 1, got {total}")
        self.total = total
        self.apply = apply
        self.running = 0

    def claim(self) -> int:
        """A new call starts: its thread count."""
        self.running += 1
        return max(1, self.total // self.running)

    def release(self) -> None:
        self.running -= 1
