"""``dreamr reason`` through its resident daemon: real processes on the shipped demo models (CPU).

Every test has a runtime folder of its own (``DREAMR_RUNTIME_DIR``), so none touches the user's
daemon, and stops whatever daemon it started. Each command runs as a user runs it, in a fresh
interpreter, wrapped so that it fails if the client imported torch or transformers.
"""

from __future__ import annotations

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

from dreamr_stream import cli
from dreamr_stream.daemon_client import DaemonFiles, daemon_alive, daemon_key, identity, runtime_dir

# main() as the console script runs it, then a check of what the client imported
CLIENT = (
    "import sys; from dreamr_stream.cli import main; rc = main(sys.argv[1:]); "
    "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
    "heavy and print('the client imported', heavy, file=sys.stderr); sys.exit(99 if heavy else rc)"
)
STEP = re.compile(r"^\s*\d+\.\d+s [✓●]", re.MULTILINE)
COMPARISON = re.compile(r"^FPSR \d+\.\d\d s, the target alone ≈?\d+\.\d\d s: ≈?\d+\.\d\dx (faster|slower) \(.*\)$")
STARTED = "dreamr: started a daemon (pid "


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


def command(root: Path, *args: str) -> list[str]:
    if args[0] == "reason":
        args = (*args, "--save-image", str(root / f"puzzle-{time.monotonic_ns()}.png"))
    return [sys.executable, "-c", CLIENT, *args]


def dreamr(root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(root, *args), capture_output=True, text=True, timeout=timeout, env=env(root))


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
def test_no_daemon_loads_the_models_in_the_command_and_leaves_nothing_behind(root: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dreamr_stream.cli", "reason", "--random", "--seed", "1", "--no-daemon",
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
