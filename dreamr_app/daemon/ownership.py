"""What the daemon's files and pid are trusted for, and the checks that earn it.

The runtime folder is this user's (0700), yet its files are still opened without following a
symbolic link and checked on the open file (a regular file of this user's, 0600), never by a
``stat`` before the open that a swap in between would fool. A pid names a process only while that
process lives: a pid is signalled only while the process that has it runs the daemon and started
when the daemon's info file says, so that a pid a later process reused is never taken for it.
Standard library only, as the rest of what the client imports.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from pathlib import Path
from typing import Any

from dreamr_stream.errors import DreamrError

__all__ = ["DAEMON_MODULE", "daemon_alive", "open_private", "running", "signal_daemon", "start_time"]

# the daemon is run as ``python -m DAEMON_MODULE``, and a live process is known for one by that name
DAEMON_MODULE = "dreamr_app.daemon.server"


def open_private(path: Path, flags: int) -> int:
    """A descriptor of ``path`` (created 0600 with ``os.O_CREAT``), refused with ``DreamrError``
    when it is a symbolic link, not a regular file, someone else's, or open to others. Checked on
    the open file itself; non-blocking so that a FIFO put there cannot hang the open."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: what FreeBSD says for a link
            raise DreamrError(f"{path} is a symbolic link: refused (remove it)") from e
        raise
    st = os.fstat(fd)
    problem = (
        "is not a regular file"
        if not stat.S_ISREG(st.st_mode)
        else "belongs to another user"
        if st.st_uid != os.getuid()
        else f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0600"
        if st.st_mode & 0o077
        else None
    )
    if problem is not None:
        os.close(fd)
        raise DreamrError(f"{path} {problem}: refused (remove it)")
    return fd


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot; None without /proc or once it is
    gone): with the pid, a name that no later process has."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, the 22nd field is the start
    return int(raw.rpartition(b")")[2].split()[19])


def daemon_alive(pid: int) -> bool:
    """A live process of ours that is a dreamr daemon (not a process that reused a dead one's pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():  # no /proc here: trust the pid
        return True
    try:
        return DAEMON_MODULE.encode() in cmdline.read_bytes()  # empty for a zombie
    except OSError:
        return False


def running(info: dict[str, Any]) -> bool:
    """The daemon an info file names still runs: its pid is a live dreamr daemon that started when
    the info says, so that a pid that a later process reused (another daemon included) is not it."""
    pid = info["pid"]
    return daemon_alive(pid) and start_time(pid) == info.get("pid_start")


def signal_daemon(info: dict[str, Any], sig: signal.Signals) -> bool:
    """``sig`` to the daemon ``info`` names if it still runs (``running``); whether it was sent.
    Through a pidfd where there is one: the pid checked is then the pid signalled, even if the
    daemon exits and its pid is reused between the check and the signal."""
    pid = info["pid"]
    if not hasattr(os, "pidfd_open"):
        if running(info):
            os.kill(pid, sig)
            return True
        return False
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # no such process
        return False
    try:
        if not running(info):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
