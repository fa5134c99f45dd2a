"""``dreamr serve`` in its own process, started as a user starts it, and what ``/proc`` and
``/stats`` say about it: shared by the benchmarks that drive a real server (``soak.py``,
``abuse.py``).

The server runs this checkout's code (its root and ``integrations`` first on ``PYTHONPATH``), so
a result belongs to the commit that ``code_version`` names, whatever else is installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHILD_MARK = "dreamr_stream.backends._process_child"  # in the command line of a model's own process

# --- the server's process tree, from /proc ---------------------------------------------------


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the draft's process and anything it started)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def proc_sample(pid: int) -> dict[str, int] | None:
    """RSS and its high-water mark (bytes), open descriptors and threads of one process; None if
    it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss": int(fields["VmRSS"].split()[0]) * 1024,
        "hwm": int(fields["VmHWM"].split()[0]) * 1024,
        "fds": fds,
        "threads": int(fields["Threads"]),
    }


def tree_sample(pid: int) -> dict[str, Any]:
    server = proc_sample(pid) or {"rss": 0, "hwm": 0, "fds": 0, "threads": 0}
    kids = {c: s for c, s in ((c, proc_sample(c)) for c in children(pid)) if s is not None}
    return {
        "server": server,
        "children": {str(c): s for c, s in kids.items()},
        "total_rss": server["rss"] + sum(s["rss"] for s in kids.values()),
        "total_fds": server["fds"] + sum(s["fds"] for s in kids.values()),
        "total_threads": server["threads"] + sum(s["threads"] for s in kids.values()),
    }


def model_children(pid: int) -> list[int]:
    """The model processes (a draft's) among ``pid``'s descendants, oldest first."""
    found = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if CHILD_MARK.encode() in cmdline:
            found.append(child)
    return sorted(found)


# --- talking to the server ---------------------------------------------------------------------


async def http_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    await writer.wait_closed()
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def idle_stats(port: int, within_s: float) -> tuple[dict[str, Any], float]:
    """``/stats`` once no connection, request or model call is left (or ``within_s`` passed),
    and how long that took."""
    t0 = time.monotonic()
    while True:
        s = await http_json(port, "/stats")
        busy = s["connections"] + s["active_requests"] + s["queued"] + s["engine_requests"] + s["in_flight"]
        if busy == 0 or time.monotonic() - t0 > within_s:
            return s, time.monotonic() - t0
        await asyncio.sleep(0.1)


# --- the server's process ----------------------------------------------------------------------


@dataclass
class ServeProcess:
    """A running ``dreamr serve``: its process, port and command line; its stderr goes to ``log``."""

    proc: subprocess.Popen[str]
    port: int
    command: list[str]
    log: Path
    banner: str  # the line it printed once serving

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> tuple[int, float, bool]:
        """Send ``sig`` and wait for the exit: (exit code, seconds, whether it exited by itself);
        one still running after ``timeout_s`` is killed, with its model processes."""
        kids = children(self.pid)
        t = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
            by_itself = True
        except subprocess.TimeoutExpired:
            for pid in [self.pid, *kids]:
                _kill(pid)
            code = self.proc.wait()
            by_itself = False
        return code, time.monotonic() - t, by_itself


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def server_env() -> dict[str, str]:
    """This process's environment with this checkout's code first on ``PYTHONPATH``."""
    paths = [str(ROOT), str(ROOT / "integrations"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def start_server(flags: list[str], log: Path) -> ServeProcess:
    """``dreamr serve --port 0 FLAGS`` (loopback, the shipped demo models), once it serves."""
    dreamr = Path(sys.executable).with_name("dreamr")
    command = [str(dreamr)] if dreamr.exists() else [sys.executable, "-m", "dreamr_app"]
    command += ["serve", "--port", "0", *flags]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=server_env())
    assert proc.stdout is not None
    for line in proc.stdout:  # "models loaded in ...; serving http://127.0.0.1:PORT/ ..."
        if found := re.search(r"serving http://127\.0\.0\.1:(\d+)/", line):
            return ServeProcess(proc, int(found.group(1)), command, log, line)
    proc.kill()
    proc.wait()
    raise SystemExit(f"dreamr serve did not start; see {log}")


def code_version() -> str:
    """The commit the server ran, and the library files that differed from it, if any."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dreamr_stream", "dreamr_app", "integrations"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return head.stdout.strip() + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")
