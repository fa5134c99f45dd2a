"""The resident daemon's life outside it: its files, its identity, starting or joining it, and
``dreamr daemon status`` / ``stop``.

The client (``client``) and the daemon (``server``) both use this module, and it imports neither:
what they agree on (how the daemon is run, its last words, the close that says a request did not
run) lives here. Like the client it imports only the standard library, rich and light modules:
never torch, transformers, or a module that imports them (tests/test_reason_daemon.py checks it).

Files, per user, in ``$DREAMR_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/dreamr``, else
``~/.cache/dreamr`` (a 0700 folder), each named by the daemon's key (its models, device and
code, so that a daemon for other models is never reused): ``KEY.sock`` (0600), ``KEY.json``
(pid and its start time, state, models), ``KEY.log`` (the daemon's output) and ``KEY.lock``
(held while one is started, so that two commands at once start one daemon; a command waits for it
at most ``$DREAMR_DAEMON_LOCK_TIMEOUT`` seconds).

Each file is opened and each pid signalled only after the checks of ``ownership``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from dreamr_app.daemon.ownership import (
    DAEMON_MODULE,
    daemon_alive,
    open_private,
    running,
    signal_daemon,
    start_time,
)
from dreamr_stream import __version__
from dreamr_stream.errors import DreamrError

__all__ = [
    "DAEMON_MODULE",
    "ERROR_PREFIX",
    "IDLE_ENV",
    "LOCK_TIMEOUT_ENV",
    "NOT_SERVED_CODE",
    "NOT_SERVED_REASON",
    "RUNTIME_ENV",
    "USAGE_PREFIX",
    "DaemonFailed",
    "DaemonFiles",
    "Started",
    "daemon_alive",
    "daemon_key",
    "identity",
    "idle_timeout",
    "running",
    "runtime_dir",
    "start_or_join",
    "status",
    "stop",
]

RUNTIME_ENV = "DREAMR_RUNTIME_DIR"
IDLE_ENV = "DREAMR_DAEMON_IDLE"  # seconds a started daemon waits for the next request
DEFAULT_IDLE_S = 600.0
READY_TIMEOUT_S = 900.0  # big models on a busy machine load slowly; a dead daemon is noticed at once anyway
LOCK_TIMEOUT_ENV = "DREAMR_DAEMON_LOCK_TIMEOUT"  # seconds a command waits for another's start of the daemon
# the lock's holder waits up to READY_TIMEOUT_S for its daemon (and 30 s for an exiting one to go)
DEFAULT_LOCK_TIMEOUT_S = READY_TIMEOUT_S + 60.0
# the daemon's last words in its log, for the client that waits for it to be ready
ERROR_PREFIX = "dreamr daemon: error: "
USAGE_PREFIX = "dreamr daemon: usage: "
# the close of a daemon that exits before it accepted any request of the connection: 1013 is
# "try again later" (RFC 6455), a code dreamr serve never sends, so it cannot be mistaken
NOT_SERVED_CODE = 1013
NOT_SERVED_REASON = "the daemon is exiting; no request of this connection ran"


class DaemonFailed(DreamrError):
    """The daemon exited (or never became ready) before serving; ``usage``: because of a bad flag."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


# ---------------------------------------------------------------------------------- files
def runtime_dir() -> Path:
    """This user's folder of daemon files, created 0700; refused if someone else owns it."""
    if env := os.environ.get(RUNTIME_ENV):
        root = Path(env)
    elif xdg := os.environ.get("XDG_RUNTIME_DIR"):
        root = Path(xdg) / "dreamr"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreamr"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.stat()
    if st.st_uid != os.getuid():
        raise DreamrError(f"{root} belongs to another user: set {RUNTIME_ENV} to a folder of your own")
    if st.st_mode & 0o077:
        root.chmod(0o700)  # the socket inside must be reachable by its owner only
    return root


@dataclass(frozen=True)
class DaemonFiles:
    root: Path
    key: str

    @property
    def socket(self) -> Path:
        return self.root / f"{self.key}.sock"

    @property
    def info(self) -> Path:
        return self.root / f"{self.key}.json"

    @property
    def log(self) -> Path:
        return self.root / f"{self.key}.log"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.key}.lock"

    def read_info(self) -> dict[str, Any] | None:
        """The info file's fields (None: none, or not an info file); ``DreamrError`` for a file
        that ``open_private`` refuses."""
        try:
            with os.fdopen(open_private(self.info, os.O_RDONLY), encoding="utf-8") as f:
                data = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None

    def write_info(self, *, merge: bool = True, **fields: Any) -> None:
        """``fields`` merged into the info file (or replacing it); atomically, as clients poll it.
        A ``pid`` is written with its start time (``pid_start``), which ``running`` checks."""
        if "pid" in fields:
            fields.setdefault("pid_start", start_time(fields["pid"]))
        data = {**((self.read_info() or {}) if merge else {}), **fields}
        tmp = self.info.with_suffix(f".{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)  # one a killed writer of this pid left: O_EXCL below
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1))
        tmp.replace(self.info)  # a rename replaces a link itself, never what it points to

    def remove(self, pid: int | None = None) -> None:
        """The socket and info file; with ``pid``, only while the info file is that daemon's."""
        info = self.read_info()
        if pid is not None and info is not None and info.get("pid") != pid:
            return
        self.socket.unlink(missing_ok=True)
        self.info.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- identity
def _fingerprint(folder: Path) -> str:
    """The folder and its newest file: retrained weights in the same folder are new models."""
    folder = folder.resolve()
    try:
        newest = max((p.stat().st_mtime_ns for p in folder.iterdir()), default=0)
    except OSError:
        newest = 0
    return f"{folder}@{newest}"


def _code_roots() -> list[Path]:
    """Where the application, the core and the websocket integration are imported from: the daemon
    runs the same code."""
    import dreamr_websocket

    import dreamr_stream

    roots = [Path(__file__).resolve().parents[2]]
    roots += [Path(p).resolve().parent for p in dreamr_stream.__path__]
    roots += [Path(p).resolve().parent for p in dreamr_websocket.__path__]
    return list(dict.fromkeys(roots))


def identity(args: argparse.Namespace) -> dict[str, str]:
    """What a daemon must share with this command to serve it: models, task, device and code."""
    from dreamr_stream.backends.shipped import demo_paths
    from dreamr_stream.tasks import DEFAULT_TASK

    task = getattr(args, "task", DEFAULT_TASK)
    ident = {"device": args.device, "version": __version__, "code": os.pathsep.join(map(str, _code_roots()))}
    # the task picks the demo's models (and the daemon's --task): one daemon per task
    ident["task"] = task
    for flag in ("target", "draft", "demo_draft", "target_url", "draft_url"):
        value = getattr(args, flag, None)
        if value:
            ident[flag] = _fingerprint(Path(value)) if flag in ("target", "draft") else str(value)
    if not args.target:  # the shipped demo (its default draft depends on what is shipped)
        paths = demo_paths(args.demo_draft, task)
        ident["demo"] = f"{_fingerprint(paths.target)} {_fingerprint(paths.draft)}"
    return ident


def daemon_key(ident: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _seconds(env: str, default: float) -> float:
    try:
        return float(os.environ.get(env, default))
    except ValueError:
        return default


def idle_timeout(args: argparse.Namespace) -> float:
    if getattr(args, "daemon_idle", None) is not None:
        return float(args.daemon_idle)
    return _seconds(IDLE_ENV, DEFAULT_IDLE_S)


# ---------------------------------------------------------------------------------- start
def _spawn(files: DaemonFiles, args: argparse.Namespace, ident: dict[str, str]) -> subprocess.Popen[bytes]:
    """The daemon, detached: a session of its own (a Ctrl-C here does not reach it), its output in its log."""
    command = [sys.executable, "-m", DAEMON_MODULE, "--runtime-dir", str(files.root), "--key", files.key]
    command += ["--idle-timeout", str(idle_timeout(args)), "--identity", json.dumps(ident), "--device", args.device]
    command += ["--task", ident["task"]]
    for flag in ("target", "draft", "demo_draft", "target_url", "draft_url"):
        if value := getattr(args, flag, None):
            if flag in ("target", "draft") and "://" not in str(value):
                value = Path(value).resolve()  # a folder named from this command's folder: the daemon runs in "/"
            command += [f"--{flag.replace('_', '-')}", str(value)]
    # from "/" so that it holds no user folder; the same code as this command, wherever that came from
    path = [*map(str, _code_roots()), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    log = open_private(files.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd="/", env=env
        )
    finally:
        os.close(log)


def _last_words(files: DaemonFiles) -> tuple[str, bool]:
    """The daemon's error line from its log (and whether it is about a flag), else where the log is."""
    try:
        with os.fdopen(open_private(files.log, os.O_RDONLY), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        for prefix, usage in ((USAGE_PREFIX, True), (ERROR_PREFIX, False)):
            if line.startswith(prefix):
                return line.removeprefix(prefix), usage
    return f"the dreamr daemon exited before serving; see its log {files.log}", False


async def _wait_ready(files: DaemonFiles, pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    """Until the daemon ``pid`` says it serves; DaemonFailed if it exits first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        info = files.read_info()
        if info is not None and info["pid"] == pid and info.get("state") == "ready":
            return
        exited = proc.poll() is not None if proc is not None else not daemon_alive(pid)
        if exited or time.monotonic() > deadline:
            message, usage = _last_words(files)
            raise DaemonFailed(message, usage=usage)
        await asyncio.sleep(0.05)


async def _wait_gone(info: dict[str, Any], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while running(info):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@contextlib.asynccontextmanager
async def locked(path: Path, timeout_s: float) -> AsyncIterator[None]:
    """The key's lock, polled so that the event loop (and the spinner) keep going meanwhile; a
    ``DreamrError`` naming its holder after ``timeout_s`` (a holder stopped or hung must not hang
    every later command). The holder writes its pid in it."""
    import fcntl

    fd = open_private(path, os.O_RDWR | os.O_CREAT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise DreamrError(
                        f"another dreamr command (pid {holder}) has been starting the daemon for over "
                        f"{timeout_s:g} s and still holds {path}; set ${LOCK_TIMEOUT_ENV} to wait longer"
                    ) from None
                await asyncio.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; so does this process dying


@dataclass(frozen=True)
class Started:
    pid: int
    log: Path


async def start_or_join(files: DaemonFiles, args: argparse.Namespace, ident: dict[str, str]) -> Started | None:
    """Under the lock: join a daemon that is still loading, else replace a dead one's files and start one.
    Returns what was started, or None when another command's daemon serves now."""
    async with locked(files.lock, _seconds(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S)):
        info = files.read_info()
        if info is not None and running(info):
            if info.get("state") != "stopping":
                with contextlib.suppress(DaemonFailed):
                    await _wait_ready(files, info["pid"], None)
                    return None
            await _wait_gone(info, 30.0)  # it is exiting (idle): let it go, then start afresh
        files.remove()  # a daemon that died (killed, crashed) leaves its socket and info behind
        proc = _spawn(files, args, ident)
        await _wait_ready(files, proc.pid, proc)
        return Started(proc.pid, files.log)


# ---------------------------------------------------------------------------------- dreamr daemon
def _daemons(root: Path) -> list[tuple[DaemonFiles, dict[str, Any]]]:
    found = [DaemonFiles(root, p.stem) for p in sorted(root.glob("*.json"))]
    return [(f, info) for f in found if (info := f.read_info()) is not None]


def _describe(info: dict[str, Any]) -> str:
    models = info.get("models", {})
    what = ", ".join(f"{k} {v}" for k, v in models.items() if k not in ("code", "version"))
    up = time.time() - float(info.get("started", time.time()))
    return (
        f"pid {info['pid']}, {info.get('state', '?')}, up {up:.0f} s, exits after "
        f"{float(info.get('idle_timeout_s', 0)):g} s idle; {what}; log {info.get('log', '?')}"
    )


def status(console: Console) -> int:
    """Every daemon of this user: 0 if one runs, 3 if none (as ``systemctl status``)."""
    alive = 0
    for files, info in _daemons(runtime_dir()):
        if running(info):
            alive += 1
            console.print(f"dreamr daemon {files.key}: {_describe(info)}", soft_wrap=True)
        else:
            files.remove(info["pid"])
            console.print(f"[dim]dreamr daemon {files.key}: pid {info['pid']} is gone; removed its files[/dim]")
    if not alive:
        console.print("no dreamr daemon is running")
    return 0 if alive else 3


def stop(console: Console, timeout_s: float = 15.0) -> int:
    """Stop every daemon of this user: SIGTERM, then SIGKILL if it has not exited in ``timeout_s``;
    only the processes the info files name that are still those daemons (``running``)."""
    stopped = 0
    for files, info in _daemons(runtime_dir()):
        pid = info["pid"]
        if signal_daemon(info, signal.SIGTERM):
            if not asyncio.run(_wait_gone(info, timeout_s)):
                signal_daemon(info, signal.SIGKILL)
                asyncio.run(_wait_gone(info, 5.0))
            stopped += 1
            console.print(f"stopped the dreamr daemon {files.key} (pid {pid})")
        files.remove(pid)
    if not stopped:
        console.print("no dreamr daemon is running")
    return 0
