"""benchmarks/soak.py's clients and checks, against a server on scripted models for a few seconds."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from ws_support import make_reasoner, serving

pytestmark = pytest.mark.asyncio

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # soak.py imports its neighbour serve_process.py
_spec = importlib.util.spec_from_file_location("soak", BENCHMARKS / "soak.py")
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak  # its dataclasses look their module up
_spec.loader.exec_module(soak)


async def test_random_asks_cancels_and_departures_leave_the_server_clean() -> None:
    args = argparse.Namespace(
        minutes=0.08, warmup_minutes=0.02, clients=6, puzzles=3, sample_s=0.5, seed=1, idle_wait_s=0.3
    )
    reasoner = make_reasoner(delay=0.002)
    # many users on one address: its limits per address lifted, as benchmarks/soak.py does
    async with serving(reasoner, max_active=2, requests_per_minute=None) as server:
        r = await soak.soak(args, server.port, os.getpid())
    assert r["errors"] == [] and r["late_messages"] == []
    assert r["fresh_request_ok"]
    after = r["stats_after"]
    assert after["connections"] == after["active_requests"] == after["queued"] == after["in_flight"] == 0
    assert r["idle_after"]["total_fds"] == r["idle_before"]["total_fds"]
    # every kind of action ran, and requests were answered, cancelled and left
    assert set(r["actions"]) == {"ask", "cancel", "leave", "reconnect"}
    assert r["outcomes"].get("stats", 0) > 0 and r["outcomes"].get("cancelled", 0) > 0
    assert r["totals"]["failed"] == r["totals"]["internal_errors"] == 0
    assert len(r["samples"]) >= 5 and all(s["server"]["rss"] > 0 for s in r["samples"])
