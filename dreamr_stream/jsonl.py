"""The JSON-lines files the library appends to (training logs, the trajectory cache of a SAPO
run, draft-step pools): read back tolerating what a crash leaves, appended to only after
repairing it.

A writer killed mid-``write`` leaves its last line torn (cut short, or never flushed past a few
bytes). That is what a crash explains, so a reader skips it with one warning, and a writer cuts
it before appending: otherwise the next line is glued to it and the damage moves to the middle of
the file. A line that does not parse anywhere else is corruption, not a crash: an error naming
the file and the line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from dreamr_stream.errors import CorruptFileError

__all__ = ["open_append", "read_jsonl"]

log = logging.getLogger(__name__)

_BLOCK = 1 << 16  # how far back a repair reads at a time to find the start of the last line


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for a multi-byte character cut in two
        return False
    return True


def read_jsonl(path: Path) -> list[Any]:
    """The records of ``path``, one per non-blank line; a last line that does not parse (a crash
    of its writer) is skipped with a warning, any other raises ``CorruptFileError``."""
    lines = [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i < len(lines) - 1:
                raise CorruptFileError(f"{path}, line {n}: not JSON ({e}); only a last line can be torn") from e
            log.warning("%s: skipping its last line %d, torn by an interrupted write", path, n)
    return records


def _last_line_start(f: IO[bytes], end: int) -> int:
    """Where the last line of ``f`` (``end`` bytes) starts, reading back from its end; a newline
    as the very last byte ends that line and does not start another."""
    pos = end - 1
    while pos > 0:
        size = min(_BLOCK, pos)
        pos -= size
        f.seek(pos)
        newline = f.read(size).rfind(b"\n")
        if newline >= 0:
            return pos + newline + 1
    return 0


def _repair(path: Path) -> None:
    """Cut a torn last line off ``path``, and end a whole one that lacks its newline."""
    try:
        f = path.open("rb+")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        start = _last_line_start(f, end)
        f.seek(start)
        last = f.read()
        if not last.strip():
            return
        if _parses(last):
            if not last.endswith(b"\n"):  # written whole but not ended: the next line must not join it
                f.write(b"\n")
            return
        log.warning("%s: cutting its last line, torn by an interrupted write, before appending", path)
        f.truncate(start)


def open_append(path: Path) -> IO[str]:
    """``path`` open to append lines to (created if missing), a torn last line cut off first."""
    _repair(path)
    return path.open("a", encoding="utf-8")
