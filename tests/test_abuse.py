"""benchmarks/abuse.py's cheap attacks, small, against a real ``dreamr serve`` on the demo models
(and a real ``dreamr zoo export``), so that the script and what it checks stay honest: formats
outside the allowlist, idle connections from one address, distinct uploads, a killed export.
The children run this checkout's code (``serve_process.server_env``)."""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the script and its neighbours
abuse = importlib.import_module("abuse")
abuse_data = importlib.import_module("abuse_data")
abuse_serve = importlib.import_module("abuse_serve")
serve_process = importlib.import_module("serve_process")

pytestmark = pytest.mark.slow

CAP = 8  # connections per address: the idle connections attack opens more than it allows


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("abuse") / "server.log"
    started = serve_process.start_server(["--max-connections-per-address", str(CAP)], log)
    yield started
    code, _, by_itself = started.stop(signal.SIGINT, 30)
    assert by_itself and code == 0, log.read_text()[-2000:]


def args(*argv: str) -> Any:
    return abuse.parse_args(list(argv))


@pytest.mark.asyncio
async def test_formats_outside_the_allowlist_are_invalid_images(server: Any) -> None:
    outcome = await abuse_serve.formats(server, args())
    assert outcome.held, outcome
    assert outcome.numbers["invalid_image"] == len(abuse_serve.FORMATS)


@pytest.mark.asyncio
async def test_idle_connections_from_one_address_leave_room_for_another(server: Any) -> None:
    outcome = await abuse_serve.idle_connections(server, args("--idle-connections", "40"))
    assert outcome.held, outcome
    assert outcome.numbers["accepted"] == CAP and outcome.numbers["refused_503"] == 40 - CAP


@pytest.mark.asyncio
async def test_distinct_uploads_are_answered_within_the_memory_budget(server: Any) -> None:
    a = args("--uploads", "20", "--side", "1024", "--upload-clients", "4", "--sample-s", "0.2")
    outcome = await abuse_serve.uploads(server, a)
    assert outcome.held, outcome
    assert outcome.numbers["stats"] + outcome.numbers.get("busy", 0) == 20
    assert outcome.numbers["rss_samples"] > 3 and outcome.numbers["rss_idle_mib"] > 0


def test_a_killed_export_leaves_the_old_folder_or_the_new_one() -> None:
    outcome = abuse_data.killed_export(args("--export-kill-at", "0"))
    assert outcome.held, outcome
    first_write, swap = outcome.numbers["trials"]
    assert first_write["killed"] and first_write["folder"] == "old intact"
    assert swap["killed"] and swap["folder"] in ("old intact", "new complete")
