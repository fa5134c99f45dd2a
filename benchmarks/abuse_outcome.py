"""What one attack of ``abuse.py`` reports: whether what must hold held, what happened, the numbers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Outcome:
    held: bool
    measured: str  # one sentence: what the attack saw
    numbers: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # each way in which it did not hold


async def timed(work: Awaitable[T], limit_s: float) -> tuple[T | None, float]:
    """``work``'s result and its seconds; None when it did not finish within ``limit_s`` (then it
    is cancelled)."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(limit_s):
            return await work, time.monotonic() - t0
    except TimeoutError:
        return None, time.monotonic() - t0


def mib(n: float) -> float:
    return round(n / 2**20, 1)
