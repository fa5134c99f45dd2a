"""Split the CPU's intra-op threads between the two models, once, for every call.

FPSR overlaps a draft call with a target call. On a CPU each call spreads its torch ops over
an intra-op (OpenMP) thread team, by default one thread per core. Two teams on the same cores
do not just share them: between parallel regions OpenMP's idle team threads spin, so each call
steals cycles the other needed. On the 2-core development machine, with the draft in its own
process, target and draft decoding at once ran 1.71x and 2.19x slower than alone with two
threads each and 0.89x and 1.15x with one, while the demo target alone decodes about as fast
on one thread as on two (``benchmarks/results/overlap.md``).

A dynamic split (all threads to a call that starts alone, half once the other lane starts)
was tried first: a call that started alone kept its team when the other began, which is the
case to avoid, and it measured no better than no split at all. So the split is static: with
a draft on the same CPU each model gets ``max(1, total // 2)`` threads for every call; a
target alone keeps them all. OpenMP's thread count is a per-thread setting, so each call's
worker thread sets its own (``use_threads``, announced by ``Capabilities.sets_threads``); a
backend in its own process (``ProcessBackend``) passes the count to its child with the call.
"""

from __future__ import annotations

from dreamr_stream.backends.base import Capabilities

__all__ = ["split_threads"]


def split_threads(target: Capabilities, draft: Capabilities | None) -> tuple[int | None, int | None]:
    """Intra-op threads for every call of (target, draft), from what each declares
    (``cpu_threads``: a server on loopback counts too, since it computes on these cores); None:
    that model is not on this CPU. A backend takes its count only if it ``sets_threads``
    (``engine.runner``)."""
    counts = (target.cpu_threads, draft.cpu_threads if draft is not None else 0)
    on_cpu = [c for c in counts if c > 0]
    if not on_cpu:
        return None, None
    each = max(1, min(on_cpu) // len(on_cpu))
    return (each if counts[0] > 0 else None), (each if counts[1] > 0 else None)
