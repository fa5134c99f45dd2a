"""How far a request's draft may run ahead, from the load and the draft's recent acceptance.

Speculation pays where verifying a drafted step costs the target less than writing it, and
that depends on the load: a serving engine batches many requests' decoding cheaply, while each
speculative step costs it a verification request. So the lookahead (0: the target alone) follows
a table by requests in flight, as vLLM's per-batch-size speculative lengths and TensorRT-LLM's
``draft_len_schedule`` do, and speculation stops while the draft's steps are mostly rejected
(TensorRT-LLM's acceptance threshold). ``plan`` is pure; the Reasoner asks it when a request
starts and the engine again at each epoch (``engine.fpsr``), so a request that started alone
stays alone and one that speculates narrows or stops as the load grows.

Without a table (``SchedulingConfig.schedule``), ``max_speculating``'s switch is the table of
one row: the configured lookahead up to the limit, the target alone above it.
"""

from __future__ import annotations

from collections import deque

from dreamr_stream.config import ScheduleRow, SchedulingConfig
from dreamr_stream.types import SpeculationPlan

__all__ = ["PROBE_EVERY", "AcceptanceWindow", "plan", "rows"]

PROBE_EVERY = 8  # below min_acceptance, every 8th request still speculates (to measure again)
UNLIMITED = 1_000_000


class AcceptanceWindow:
    """The draft's acceptance over its last ``size`` judged steps, all requests together."""

    def __init__(self, size: int = 64) -> None:
        self.verdicts: deque[bool] = deque(maxlen=size)
        self.low = 0  # requests that found it below the threshold, for probing

    def add(self, judged: int, accepted: int) -> None:
        """One request's verdicts (their order within it does not matter here)."""
        self.verdicts.extend([True] * accepted + [False] * (judged - accepted))

    @property
    def value(self) -> float | None:
        return sum(self.verdicts) / len(self.verdicts) if self.verdicts else None


def rows(scheduling: SchedulingConfig, limit: int | None) -> tuple[ScheduleRow, ...]:
    """The schedule's table; without one, the switch's: ``limit`` (the resolved
    ``max_speculating``; None: no limit) at the configured lookahead."""
    if scheduling.schedule is not None:
        return scheduling.schedule
    return (ScheduleRow(in_flight=limit or UNLIMITED, lookahead=scheduling.lookahead),)


def plan(
    table: tuple[ScheduleRow, ...],
    *,
    in_flight: int,
    acceptance: float | None = None,
    min_acceptance: float = 0.0,
    probe: bool = False,
    max_lookahead: int = 16,
) -> SpeculationPlan:
    """The lookahead (and mode) for ``in_flight`` requests: the first row whose ``in_flight``
    is at least it; above the last row, 0. Below ``min_acceptance`` 0 too, unless ``probe``."""
    row = next((r for r in table if in_flight <= r.in_flight), None)

    def chosen(lookahead: int, reason: str, mode: str | None = None) -> SpeculationPlan:
        return SpeculationPlan(
            in_flight=in_flight, acceptance=acceptance, lookahead=lookahead, mode=mode, reason=reason
        )

    if row is None:
        return chosen(0, f"load: {in_flight} requests in flight (speculating up to {table[-1].in_flight})")
    if row.lookahead == 0:
        return chosen(0, f"load: {in_flight} requests in flight (the target alone up to {row.in_flight})")
    if acceptance is not None and acceptance < min_acceptance and not probe:
        return chosen(0, f"acceptance: {acceptance:.2f} below min_acceptance {min_acceptance:g}")
    low = acceptance is not None and acceptance < min_acceptance
    why = "probe: acceptance measured again" if low else "schedule"
    return chosen(min(row.lookahead, max_lookahead), f"{why}: up to {row.in_flight} in flight", row.mode)
