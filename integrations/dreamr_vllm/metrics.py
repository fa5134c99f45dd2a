"""What a vLLM server spent, read from its Prometheus ``/metrics`` before and after some work.

The load bench asks it around each method's round, so that a method's cost on the server is
told apart from the client's: requests, prompt and generated tokens, prefix-cache hits, and
the seconds requests spent queued, in prefill and in decode (vLLM's own histograms' sums). For
a server on this machine it also reads the CPU seconds its processes used (``cpu_seconds``,
from ``/proc``): what a method costs the server, which other work on the machine barely
changes, where wall time on a shared 2-core machine swings by tens of percent.
The exposition format is a few lines to read (``name{labels} value``), so no client library is
pulled in for it; series of one name are summed over their labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

__all__ = ["COUNTERS", "cpu_seconds", "delta", "find_server_pid", "read_metrics"]

# the name in the bench's tables -> vLLM's series
COUNTERS = {
    "requests": "vllm:e2e_request_latency_seconds_count",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generated_tokens": "vllm:generation_tokens_total",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "queue_s": "vllm:request_queue_time_seconds_sum",
    "prefill_s": "vllm:request_prefill_time_seconds_sum",
    "decode_s": "vllm:request_decode_time_seconds_sum",
}


def parse(text: str) -> dict[str, float]:
    """``COUNTERS``' values in an exposition text (0 for a series it lacks)."""
    wanted = {series: name for name, series in COUNTERS.items()}
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series = line.split("{", 1)[0].split(" ", 1)[0]
        name = wanted.get(series)
        if name is not None:
            try:
                out[name] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return out


async def read_metrics(client: httpx.AsyncClient, api_url: str) -> dict[str, float] | None:
    """The server's counters now (``api_url`` is the API base, ``.../v1``); None when it has no
    ``/metrics`` (another server)."""
    base = api_url.rstrip("/").removesuffix("/v1")
    try:
        r = await client.get(base + "/metrics")
    except httpx.HTTPError:
        return None
    return parse(r.text) if r.status_code == 200 else None


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in COUNTERS}


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used) of a process, from ``/proc/PID/stat``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks  # ppid; utime + stime


def cpu_seconds(root: int) -> float | None:
    """CPU seconds used so far by process ``root`` and every process below it (a vLLM server's
    API process, its engine core and workers); None when it is not running here."""
    procs = {pid: st for pid in os.listdir("/proc") if pid.isdigit() and (st := _stat(pid)) is not None}
    if str(root) not in procs:
        return None
    tree, total, frontier = {root}, 0.0, [root]
    while frontier:
        parent = frontier.pop()
        total += procs[str(parent)][1]
        for pid, (ppid, _) in procs.items():
            if ppid == parent and int(pid) not in tree:
                tree.add(int(pid))
                frontier.append(int(pid))
    return total


def find_server_pid(port: int) -> int | None:
    """The vLLM API server process listening on ``port`` here (by its command line)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and b"--port" in argv:
            at = argv.index(b"--port")
            if at + 1 < len(argv) and argv[at + 1] == str(port).encode():
                return int(pid)
    return None
