"""``dreamr reason`` through its resident daemon: real processes on the shipped demo models (CPU).

Every test has a runtime folder of its own (``DREAMR_RUNTIME_DIR``), so none touches the user's
daemon, and stops whatever daemon it started. Each command runs as a user runs it, in a fresh
interpreter, wrapped so that it fails if the client imported torch or transformers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dreamr_websocket.settings import ServerSettings
from PIL import Image
from ws_support import QUESTION, make_reasoner

from dreamr_app import cli
from dreamr_app.common import Request
from dreamr_app.daemon.client import RemoteEngine, connect
from dreamr_app.daemon.files import (
    DAEMON_MODULE,
    DaemonFiles,
    daemon_alive,
    daemon_key,
    identity,
    locked,
    runtime_dir,
    start_or_join,
)
from dreamr_app.daemon.ownership import start_time
from dreamr_app.daemon.server import ResidentServer
from dreamr_stream.backends.shipped import WEIGHTS
from dreamr_stream.errors import DreamrError
from dreamr_stream.events import Event, FailedEvent, FinishedEvent

# main() as the console script runs it, then a check of what the client imported
CLIENT = (
    "import sys; from dreamr_app.cli import main; rc = main(sys.argv[1:]); "
    "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
    "heavy and print('the client imported', heavy, file=sys.stderr); sys.exit(99 if heavy else rc)"
)
# holds a start lock as another command does, says so, and waits
HOLD_LOCK = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); time.sleep(60)"
)
STEP = re.compile(r"^\s*\d+\.\d+s [✓●]", re.MULTILINE)
COMPARISON = re.compile(r"^FPSR \d+\.\d\d s, the target alone ≈?\d+\.\d\d s: ≈?\d+\.\d\dx (faster|slower) \(.*\)$")
STARTED = "dreamr: started a daemon (pid "
RESENT = "dreamr: the daemon exited before it took the request; sending it to a fresh one"
# CLIENT, with the daemon it finds stopped (SIGTERM) after its hello and before its request is
# sent: a daemon reaching its idle timeout as a command connects, on cue
STOP_AFTER_HELLO = """
import os, signal
from dreamr_app.daemon import client as daemon_client
real_connect, stopped = daemon_client.connect, []

async def connect(files):
    ws = await real_connect(files)
    if ws is not None and not stopped:
        stopped.append(files.read_info()["pid"])
        os.kill(stopped[0], signal.SIGTERM)
        await ws.wait_closed()  # closed by the daemon before the request is sent: no luck in the timing
    return ws

daemon_client.connect = connect
"""
# CLIENT, with the daemon killed right after the request is sent: it may have started it
KILL_AFTER_SEND = """
import os, signal
from dreamr_app.daemon import client as daemon_client
real_send = daemon_client.RemoteEngine._send

async def send(self, request, options):
    await real_send(self, request, options)
    os.kill(self.files.read_info()["pid"], signal.SIGKILL)

daemon_client.RemoteEngine._send = send
"""


@pytest.fixture
def root() -> Iterator[Path]:
    """A runtime folder of this test's own, and no daemon left in it afterwards. Short, under /tmp:
    a unix socket's path has at most 107 bytes, and pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="dr-", dir="/tmp"))
    try:
        yield path
    finally:
        for info in path.glob("*.json"):
            data = DaemonFiles(path, info.stem).read_info()
            if data is not None and daemon_alive(data["pid"]):
                os.kill(data["pid"], signal.SIGKILL)
                wait_gone(data["pid"])
        shutil.rmtree(path, ignore_errors=True)


def env(root: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "DREAMR_RUNTIME_DIR": str(root), "COLUMNS": "200"}


def command(root: Path, *args: str, patch: str = "") -> list[str]:
    if args[0] == "reason":
        args = (*args, "--save-image", str(root / f"puzzle-{time.monotonic_ns()}.png"))
    return [sys.executable, "-c", patch + CLIENT, *args]


def dreamr(root: Path, *args: str, timeout: float = 180, patch: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(root, *args, patch=patch), capture_output=True, text=True, timeout=timeout, env=env(root)
    )


def daemons(root: Path) -> list[int]:
    """The pids of the daemons the runtime folder lists."""
    infos = (DaemonFiles(root, p.stem).read_info() for p in sorted(root.glob("*.json")))
    return [info["pid"] for info in infos if info is not None]


def wait_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while daemon_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_answered(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert STEP.search(out.stdout), out.stdout
    assert "Answer:" in out.stdout and "first step" in out.stdout
    assert COMPARISON.fullmatch(out.stdout.strip().splitlines()[-1]), out.stdout


# ---------------------------------------------------------------------------------- without models
def test_the_runtime_folder_is_private_and_the_key_names_models_device_and_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DREAMR_RUNTIME_DIR", str(tmp_path / "rt"))
    assert runtime_dir().stat().st_mode & 0o777 == 0o700
    parse = cli.build_parser().parse_args
    key = daemon_key(identity(parse(["reason", "--random"])))
    assert key == daemon_key(identity(parse(["reason", "--random", "--seed", "4"])))  # the request is not the daemon
    assert key != daemon_key(identity(parse(["reason", "--random", "--device", "cuda"])))
    other = tmp_path / "target"
    other.mkdir()
    assert key != daemon_key(identity(parse(["reason", "--random", "--target", str(other)])))
    assert "code" in identity(parse(["reason", "--random"]))  # another checkout's daemon is another daemon
    assert key != daemon_key(identity(parse(["reason", "--random", "--task", "charts"])))  # another task's models


def test_status_and_stop_with_no_daemon_and_a_dead_ones_files(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DREAMR_RUNTIME_DIR", str(root))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = DaemonFiles(root, "0123456789abcdef")
    files.write_info(pid=dead.pid, state="ready")
    files.socket.touch()
    assert cli.main(["daemon", "status"]) == 3
    assert "is gone; removed its files" in capsys.readouterr().out
    assert not files.info.exists() and not files.socket.exists()
    assert cli.main(["daemon", "stop"]) == 0
    assert "no dreamr daemon is running" in capsys.readouterr().out


def test_a_symlinked_or_open_daemon_file_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DREAMR_RUNTIME_DIR", str(root))
    files = DaemonFiles(root, "0123456789abcdef")
    elsewhere = root / "elsewhere.txt"
    elsewhere.write_text(json.dumps({"pid": os.getpid(), "state": "ready"}))
    elsewhere.chmod(0o600)
    try:
        for path in (files.info, files.lock, files.log):
            path.symlink_to(elsewhere)
        with pytest.raises(DreamrError, match=f"{files.info} is a symbolic link: refused"):
            files.read_info()
        with pytest.raises(DreamrError, match=f"{files.lock} is a symbolic link: refused"):
            asyncio.run(locked(files.lock, 1.0).__aenter__())
        assert cli.main(["daemon", "status"]) == cli.EXIT_FAILED
        assert "is a symbolic link: refused" in capsys.readouterr().err
        files.info.unlink()
        files.write_info(pid=os.getpid(), state="ready")  # replaces a link, never writes through it
        assert not files.info.is_symlink() and files.info.stat().st_mode & 0o777 == 0o600
        assert json.loads(elsewhere.read_text()) == {"pid": os.getpid(), "state": "ready"}
        files.info.chmod(0o644)
        with pytest.raises(DreamrError, match="has mode 0644, not 0600: refused"):
            files.read_info()
    finally:
        for path in (files.info, files.lock, files.log):
            path.unlink(missing_ok=True)


def test_a_start_lock_held_by_another_process_fails_after_its_deadline_naming_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = DaemonFiles(root, "0123456789abcdef")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(files.lock)], stdout=subprocess.PIPE, text=True, env=env(root)
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        monkeypatch.setenv("DREAMR_DAEMON_LOCK_TIMEOUT", "0.3")
        args = cli.build_parser().parse_args(["reason", "--random"])
        started = time.monotonic()
        with pytest.raises(DreamrError, match=f"another dreamr command \\(pid {holder.pid}\\) has been starting"):
            asyncio.run(asyncio.wait_for(start_or_join(files, args, {}), 10))  # before a deadline: a hang
        assert time.monotonic() - started < 5 and holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_stop_never_signals_a_process_that_reused_the_daemons_pid(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DREAMR_RUNTIME_DIR", str(root))
    # a later process with the daemon's pid (and even the daemon's name on its command line)
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", DAEMON_MODULE])
    try:
        files = DaemonFiles(root, "0123456789abcdef")
        daemon_started = start_time(os.getpid())  # when the daemon that had the pid started: earlier
        assert daemon_started is not None and daemon_started != start_time(later.pid)
        files.write_info(pid=later.pid, pid_start=daemon_started, state="ready")
        assert cli.main(["daemon", "stop"]) == 0
        assert "no dreamr daemon is running" in capsys.readouterr().out
        assert later.poll() is None and not files.info.exists()
        files.write_info(pid=later.pid, state="ready")  # its own start time: it is the daemon
        assert cli.main(["daemon", "stop"]) == 0
        assert f"(pid {later.pid})" in capsys.readouterr().out and later.wait(10) == -signal.SIGTERM
    finally:
        later.kill()
        later.wait()


def test_a_flag_the_protocol_refuses_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    """The daemon speaks the WebSocket protocol, whose tau is finite: ``--tau inf`` is one line, not a traceback."""
    from dreamr_app.common import UsageError

    parse = cli.build_parser().parse_args
    files = DaemonFiles(tmp_path, "0123456789abcdef")
    assert RemoteEngine(None, parse(["reason", "--random", "--tau", "2"]), files)._options("fpsr").tau == 2  # type: ignore[arg-type]
    for tau in ("inf", "nan", "-1"):
        engine = RemoteEngine(None, parse(["reason", "--random", "--tau", tau]), files)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match=r"^--tau: "):
            engine._options("fpsr")


# ---------------------------------------------------------------------------------- exiting daemons
def resident(files: DaemonFiles) -> ResidentServer:
    """The daemon's server on scripted models; on closing it says so in its info, as the daemon does."""
    files.write_info(merge=False, pid=os.getpid(), state="ready")
    settings = ServerSettings(unix_path=str(files.socket), serve_page=False)
    return ResidentServer(make_reasoner(), settings, on_closing=lambda: files.write_info(state="stopping"))


def remote(ws: object, files: DaemonFiles, reconnect: object = None) -> RemoteEngine:
    args = cli.build_parser().parse_args(["reason", "--random"])
    return RemoteEngine(ws, args, files, reconnect)  # type: ignore[arg-type]


def test_a_daemon_that_reaches_its_idle_timeout_as_a_command_connects_refuses_it_before_its_hello(root: Path) -> None:
    files = DaemonFiles(root, "0123456789abcdef")

    async def scenario() -> None:
        async with resident(files) as server:
            await server.until_idle(0.0)  # decided: no connection was open
            # the socket is still there (the real daemon unlinks it now): a command that connects
            # in this moment finds the daemon leaving, in its info too, so it starts the next one
            info = {"pid": os.getpid(), "pid_start": start_time(os.getpid()), "state": "stopping"}
            assert server.closing and files.read_info() == info
            assert await connect(files) is None

    asyncio.run(scenario())


def test_a_request_the_exiting_daemon_did_not_take_goes_once_to_a_fresh_daemon(root: Path) -> None:
    old, fresh = DaemonFiles(root, "0" * 16), DaemonFiles(root, "1" * 16)
    request = Request(Image.new("RGB", (32, 32), (200, 10, 10)), QUESTION)

    async def scenario() -> list[Event]:
        async with resident(old) as leaving, resident(fresh):
            ws = await connect(old)
            assert ws is not None
            leaving.begin_closing()  # after this connection's hello, before its request arrives
            reconnects: list[int] = []

            async def reconnect() -> object:
                reconnects.append(1)
                return await connect(fresh)

            engine = remote(ws, old, reconnect)
            events = [event async for event in engine.stream(request, "fpsr")]
            await engine.close()
            assert reconnects == [1]
            return events

    events = asyncio.run(scenario())
    assert isinstance(events[-1], FinishedEvent) and events[-1].result.answer
    assert not any(isinstance(e, FailedEvent) for e in events)


def test_a_request_the_daemon_took_is_not_sent_again_when_the_daemon_goes(root: Path) -> None:
    files = DaemonFiles(root, "0123456789abcdef")
    request = Request(Image.new("RGB", (32, 32), (200, 10, 10)), QUESTION)

    async def scenario() -> list[Event]:
        server = resident(files)
        async with server:
            ws = await connect(files)
            assert ws is not None

            async def reconnect() -> object:
                raise AssertionError("a request the daemon took was sent again")

            engine = remote(ws, files, reconnect)
            events: list[Event] = []
            async for event in engine.stream(request, "fpsr"):
                events.append(event)
                if len(events) == 1:  # running: the daemon stops (SIGTERM) under it
                    server.begin_closing()
                    await server.refuse_waiting()
                    await server.stop()
            await engine.close()
            return events

    events = asyncio.run(scenario())
    assert isinstance(events[-1], FailedEvent) and events[-1].error == "DaemonGone"
    assert "it was not sent again" in events[-1].message and "\n" not in events[-1].message


# ---------------------------------------------------------------------------------- real daemons
@pytest.mark.slow
def test_two_first_calls_start_one_daemon_that_the_next_call_reuses(root: Path) -> None:
    first = [subprocess.Popen(command(root, "reason", "--random", "--seed", s), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(root)) for s in ("1", "2")]  # fmt: skip
    outs = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=240)) for p in first]
    for p, out in zip(first, outs, strict=True):
        out.returncode = p.returncode
    for out in outs:
        assert_answered(out)
    assert sum(out.stderr.count(STARTED) for out in outs) == 1  # the lock: one daemon, said once
    (pid,) = daemons(root)
    assert daemon_alive(pid) and next(root.glob("*.sock")).stat().st_mode & 0o777 == 0o600

    again = dreamr(root, "reason", "--random", "--seed", "3", "--compare")  # (CLIENT: no torch here)
    assert_answered(again)
    assert STARTED not in again.stderr and "models loaded (the resident daemon)" in again.stdout
    assert again.stdout.strip().endswith("(measured)")
    assert daemons(root) == [pid]

    status = dreamr(root, "daemon", "status")
    assert status.returncode == 0 and f"pid {pid}, ready" in status.stdout
    stop = dreamr(root, "daemon", "stop")
    assert stop.returncode == 0 and f"(pid {pid})" in stop.stdout
    assert wait_gone(pid) and not list(root.glob("*.sock")) and not list(root.glob("*.json"))


@pytest.mark.slow
def test_each_task_is_answered_by_a_daemon_holding_its_own_models(root: Path) -> None:
    grid = dreamr(root, "reason", "--random", "--seed", "1")
    assert_answered(grid)
    assert "Row 1:" in grid.stdout and "Bar " not in grid.stdout
    (grid_pid,) = daemons(root)
    charts = dreamr(root, "reason", "--task", "charts", "--random", "--seed", "1")
    assert_answered(charts)
    assert STARTED in charts.stderr  # not the grid's daemon, whose models know no charts
    assert "Bar " in charts.stdout and "Row " not in charts.stdout
    assert grid_pid in daemons(root) and len(daemons(root)) == 2


@pytest.mark.slow
def test_model_folders_named_relative_to_the_commands_folder_reach_the_daemon(root: Path) -> None:
    """The daemon runs in "/": a relative --target or --draft is the command's, not the daemon's."""
    out = subprocess.run(
        command(root, "reason", "--random", "--seed", "4", "--target", "weights/target",
                "--draft", "weights/draft-sapo"),
        capture_output=True, text=True, timeout=240, env=env(root), cwd=WEIGHTS.parent,
    )  # fmt: skip
    assert_answered(out)
    assert STARTED in out.stderr


@pytest.mark.slow
def test_no_daemon_loads_the_models_in_the_command_and_leaves_nothing_behind(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dreamr_app", "reason", "--random", "--seed", "1", "--no-daemon",
         "--save-image", str(root / "p.png")],
        capture_output=True, text=True, timeout=180, env=env(root),
    )  # fmt: skip
    assert_answered(out)
    assert STARTED not in out.stderr and "models loaded in" in out.stdout
    assert not list(root.glob("*.sock")) and not list(root.glob("*.json"))


@pytest.mark.slow
def test_a_killed_daemons_stale_socket_is_replaced(root: Path) -> None:
    assert_answered(dreamr(root, "reason", "--random", "--seed", "1", "--daemon-idle", "120"))
    (pid,) = daemons(root)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    assert list(root.glob("*.sock")), "a killed daemon leaves its socket"

    out = dreamr(root, "reason", "--random", "--seed", "2", "--daemon-idle", "120")
    assert_answered(out)
    assert STARTED in out.stderr
    (new,) = daemons(root)
    assert new != pid and daemon_alive(new)


@pytest.mark.slow
def test_an_idle_daemon_exits_by_itself(root: Path) -> None:
    out = dreamr(root, "reason", "--random", "--seed", "1", "--daemon-idle", "1")
    assert_answered(out)
    started = re.search(r"started a daemon \(pid (\d+)\).*exits after 1 s idle", out.stderr)
    assert started, out.stderr
    assert wait_gone(int(started[1]), 30.0)
    assert not list(root.glob("*.sock")) and not list(root.glob("*.json"))


@pytest.mark.slow
def test_a_command_whose_daemon_exits_before_taking_the_request_sends_it_to_a_fresh_one(root: Path) -> None:
    assert_answered(dreamr(root, "reason", "--random", "--seed", "1", "--daemon-idle", "120"))
    (pid,) = daemons(root)

    out = dreamr(root, "reason", "--random", "--seed", "2", "--daemon-idle", "120", patch=STOP_AFTER_HELLO)
    assert_answered(out)  # (CLIENT: still no torch here)
    assert RESENT in out.stderr and STARTED in out.stderr, out.stderr
    assert wait_gone(pid)
    (new,) = daemons(root)
    assert new != pid and daemon_alive(new)


@pytest.mark.slow
def test_a_daemon_that_dies_under_a_request_is_reported_in_one_line_and_not_asked_again(root: Path) -> None:
    assert_answered(dreamr(root, "reason", "--random", "--seed", "1", "--daemon-idle", "120"))
    (pid,) = daemons(root)

    out = dreamr(root, "reason", "--random", "--seed", "2", "--daemon-idle", "120", patch=KILL_AFTER_SEND)
    assert out.returncode == 1, out.stdout + out.stderr
    (failed,) = [line for line in out.stdout.splitlines() if "DaemonGone" in line]
    assert failed.startswith("failed: DaemonGone: the daemon exited during the request")
    assert "it was not sent again" in failed and RESENT not in out.stderr and STARTED not in out.stderr
    assert wait_gone(pid) and daemons(root) == [pid]  # no daemon started for it (the killed one's info stays)
