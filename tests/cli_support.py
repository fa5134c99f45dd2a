"""Running the ``dreamr`` command as a user does: a fresh interpreter, offline, a bare PATH."""

from __future__ import annotations

import subprocess
import sys


def run_dreamr(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dreamr_app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
