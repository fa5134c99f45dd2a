"""The attacks of ``abuse.py`` on what is stored: poisoned values in a real Redis under the keys a
request reads, and ``dreamr zoo export`` killed mid-write over a folder exported before. Each
returns an ``Outcome``; ``abuse.py`` says what must hold.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from abuse_outcome import Outcome
from serve_process import server_env

from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import CacheConfig
from dreamr_stream.events import CacheHitEvent
from dreamr_stream.reasoner import Reasoner
from dreamr_stream.store import Trajectory
from dreamr_stream.tasks import get_task, items

# --- poisoned values in Redis ------------------------------------------------------------------


def private_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A ``redis-server`` of this run's own, on a unix socket in ``folder`` (no port to find or
    share; nothing on disk), once it accepts connections; and its URL."""
    sock = folder / "redis.sock"
    private = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(["redis-server", *private], stdout=subprocess.DEVNULL)
    for _ in range(200):
        if sock.exists():
            return proc, f"unix://{sock}"
        time.sleep(0.025)
    proc.kill()
    raise RuntimeError("redis-server did not open its socket within 5 s")


def poisons(digest: str, question: str) -> dict[str, Trajectory]:
    """What whoever can write to the store could put under a request's key, each to be reported
    as the verified answer."""
    lie = "Answer: 999"
    return {
        "wrong question": Trajectory(steps=[lie], image=digest, question=question + " (or another one)"),
        "wrong image digest": Trajectory(steps=[lie], image="0" * len(digest), question=question),
        "10,000 steps": Trajectory(steps=["look again"] * 9_999 + [lie], image=digest, question=question),
        "a 1 MB step": Trajectory(steps=["x" * 2**20, lie], image=digest, question=question),
    }


class Ignored(logging.Handler):
    """Counts the cache's "is ignored" warnings: a miss because a check refused the value (not
    because the store was slow)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "is ignored" in record.getMessage()


async def poisoned_runs(url: str) -> tuple[dict[str, dict[str, object]], bool]:
    """Each poison under the request's key, with ``trust`` off and on: whether the steps equal the
    uncached ones, whether the value was a hit, and whether a check refused it; and whether the
    honest value, put back, is a hit (the key is the one a request reads)."""
    from dreamr_redis import RedisTrajectoryStore

    item = next(items(get_task(), "test", 1, start=73_000))
    demo = Reasoner.demo(draft_process=False)
    assert demo.draft is not None
    store = RedisTrajectoryStore(url, prefix=f"abuse:{uuid.uuid4().hex}:")

    def reasoner(trust: bool) -> Reasoner:
        cache = CacheConfig(trust=trust, timeout_s=2.0)  # a miss by a check, not by the clock
        config = demo.config.model_copy(update={"cache": cache})
        return Reasoner(demo.target.backend, demo.draft.backend, config=config, store=store)  # type: ignore[union-attr]

    ignored = Ignored()
    logging.getLogger("dreamr_stream.engine.cache").addHandler(ignored)
    runs: dict[str, dict[str, object]] = {}
    try:
        cold = [s.text for s in (await reasoner(False).ainvoke(item.image, item.question)).steps]
        [first, *_] = await store.read_log()  # the request's key
        honest = await store.get(first.key)  # the value it wrote
        assert honest is not None
        for trust in (False, True):
            for name, poison in poisons(honest.image, honest.question).items():
                await store.put(first.key, poison)
                before = ignored.count
                events = [e async for e in reasoner(trust).astream_events(item.image, item.question)]
                result = events[-1].result  # type: ignore[union-attr]
                runs[f"{name}, trust {'on' if trust else 'off'}"] = {
                    "steps_equal": [s.text for s in result.steps] == cold,
                    "hit": any(isinstance(e, CacheHitEvent) for e in events),
                    "refused_by_check": ignored.count > before,
                }
        await store.put(first.key, honest)
        events = [e async for e in reasoner(False).astream_events(item.image, item.question)]
        return runs, any(isinstance(e, CacheHitEvent) for e in events)
    finally:
        logging.getLogger("dreamr_stream.engine.cache").removeHandler(ignored)
        demo.close()


async def poisoned_cache(args: argparse.Namespace) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="dreamr-abuse-") as tmp:
        proc, url = private_redis(Path(tmp))
        try:
            runs, honest_hit = await poisoned_runs(url)
        finally:
            proc.kill()
            proc.wait()
    problems = [f"{name}: {r}" for name, r in runs.items() if not r["steps_equal"] or r["hit"]]
    problems += [] if honest_hit else ["the honest value, put back, was not a hit: the poisons were not read"]
    equal = sum(bool(r["steps_equal"]) for r in runs.values())
    return Outcome(
        held=not problems,
        measured=(
            f"{len(runs)} poisoned values (4 kinds, trust off and on) under the request's key: steps equal to the "
            f"uncached ones {equal}/{len(runs)}, hits {sum(bool(r['hit']) for r in runs.values())}, refused by the "
            f"checks {sum(bool(r['refused_by_check']) for r in runs.values())}; the honest value put back: "
            f"{'a hit' if honest_hit else 'a miss'}"
        ),
        numbers={"poisons": len(runs), "steps_equal": equal, "runs": runs, "honest_value_hits": honest_hit},
        problems=problems,
    )


# --- a killed export ----------------------------------------------------------------------------


def export(out: Path, tau: float) -> list[str]:
    """``dreamr zoo export`` of the shipped target (as its own checkpoint) to ``out``."""
    target = demo_paths().target
    flags = ["--processor", str(target), "--out", str(out), "--verify", "likelihood", "--tau", str(tau)]
    return [sys.executable, "-m", "dreamr_app", "zoo", "export", str(target), *flags]


def hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256); empty when it is missing."""
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


Listing = list[tuple[str, int, int]]


def listing(parent: Path) -> Listing:
    """What is under ``parent``: (path, size, mtime) of each entry, to see the export start."""
    return sorted((str(p.relative_to(parent)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in parent.rglob("*"))


def export_over(out: Path, tau: float, kill_at: int | None, *, at_swap: bool = False) -> tuple[bool, int]:
    """Run an export over ``out``, SIGKILLed when it has made its ``kill_at``-th change under
    ``out``'s folder, as polling sees them, or (``at_swap``) its first change to ``out`` itself
    (None and False: it runs to its end): whether it was killed, and the changes seen. Changes,
    not seconds: the kill lands at the same point of the export's work however loaded the
    machine is."""
    seen = listing(out.parent)

    def own(entries: Listing) -> Listing:
        return [e for e in entries if e[0] == out.name or e[0].startswith(out.name + "/")]

    proc = subprocess.Popen(export(out, tau), env=server_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    changes = 0
    while proc.poll() is None:
        try:
            now = listing(out.parent)
        except FileNotFoundError:  # a file went while we listed: look again
            continue
        if now != seen:
            changes += 1
            if changes == kill_at or (at_swap and own(now) != own(seen)):
                proc.send_signal(signal.SIGKILL)
                break
            seen = now
        time.sleep(0.0002)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"dreamr zoo export failed ({proc.returncode}): {err.decode()[-500:]}")
    return proc.returncode == -signal.SIGKILL, changes


def folder_state(out: Path, old: dict[str, str], new: dict[str, str]) -> str:
    now = hashes(out)
    state = "old intact" if now == old else "new complete" if now == new else "mixed" if now else "missing"
    if state == "missing" and out.with_name(f".{out.name}.old").is_dir():
        state += " (the old one aside: the next export puts it back)"
    return state


def killed_export(args: argparse.Namespace) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="dreamr-abuse-") as tmp:
        work, pristine, reference = Path(tmp, "work"), Path(tmp, "pristine"), Path(tmp, "reference", "model")
        out = work / "model"
        subprocess.run(export(pristine, 1.0), env=server_env(), check=True, capture_output=True)
        shutil.copytree(pristine, reference)
        _, n = export_over(reference, 2.0, None)  # the changes an export makes, as polling sees them
        old, new = hashes(pristine), hashes(reference)
        trials: list[dict[str, Any]] = []
        points = [(1 + round(f * (n - 1)), False) for f in sorted(set(args.export_kill_at))] + [(None, True)]
        for k, at_swap in points:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, out)
            killed, seen = export_over(out, 2.0, k, at_swap=at_swap)
            left = sorted(p.name for p in work.iterdir() if p != out)
            when = f"its first change to the folder itself (change {seen})" if at_swap else f"change {k}"
            trials.append({"at": when, "killed": killed, "folder": folder_state(out, old, new), "left": left})
        # the last trial's leftovers: the next export recovers them and writes the folder whole
        subprocess.run(export(out, 2.0), env=server_env(), check=True, capture_output=True)
        recovered = hashes(out) == new and sorted(p.name for p in work.iterdir()) == [out.name]
    whole = ("old intact", "new complete")
    problems = [
        f"killed at change {t['at_change']}: the folder is {t['folder']}" for t in trials if t["folder"] not in whole
    ]
    problems += [] if recovered else ["the next export did not leave the new folder whole and alone"]
    return Outcome(
        held=not problems,
        measured=(
            f"{len(trials)} exports killed (SIGKILL), at "
            + ", ".join(t["at"] for t in trials)
            + f" (of {n} changes an export makes, as polling sees them): "
            + ", ".join(f"{t['folder']}{' (finished first)' if not t['killed'] else ''}" for t in trials)
            + f"; left beside it: {sorted({n for t in trials for n in t['left']}) or 'nothing'}; the next "
            f"export: {'the new folder whole, nothing beside it' if recovered else 'NOT recovered'}"
        ),
        numbers={
            "changes_of_an_export": n,
            "trials": trials,
            "files_hashed": len(old),
            "recovered_by_next_export": recovered,
        },
        problems=problems,
    )
