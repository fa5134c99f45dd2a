"""``python -m dreamr_app.daemon.server``: the resident process behind ``dreamr reason``.

It loads the models once, then serves ``dreamr serve``'s WebSocket protocol on a unix socket
(0600, in a 0700 folder) to the commands of the same user, until it has had no connection for
``--idle-timeout`` seconds, or gets SIGTERM (``dreamr daemon stop``). ``dreamr reason`` starts it
(``dreamr_app.daemon.files``: the files, the key, the lock); nothing else needs to.

Once the daemon decides to exit it accepts no new request: it closes the connections that have
asked nothing with ``NOT_SERVED`` (their clients send the request to a fresh daemon, knowing it
did not run here), and cancels only the requests already running.

Why the protocol of ``dreamr serve``: it already streams a Reasoner's events with a schema,
cancels a request whose client leaves, and queues concurrent requests; a second protocol for
the same events would drift from it. The daemon is an application of that integration: it
composes ``dreamr_websocket``'s server with the core's ``Reasoner``, and neither knows of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from dreamr_websocket.server import DreamrServer
from dreamr_websocket.session import Session
from dreamr_websocket.settings import ServerSettings

from dreamr_app.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_model_flags,
    add_task_flag,
    check_device,
    exit_now,
    load_reasoner,
    quiet_libraries,
)
from dreamr_app.daemon.files import (
    DAEMON_MODULE,
    ERROR_PREFIX,
    NOT_SERVED_CODE,
    NOT_SERVED_REASON,
    USAGE_PREFIX,
    DaemonFiles,
)
from dreamr_stream.errors import DreamrError

if TYPE_CHECKING:
    from dreamr_websocket.connection import Connection

    from dreamr_stream.config import ReasonerConfig
    from dreamr_stream.reasoner import Reasoner

__all__ = ["MAX_STEPS_CEILING", "ResidentServer", "base_config", "main", "serve"]

log = logging.getLogger(DAEMON_MODULE)
# requests set their own max_steps (the flag); the daemon's is only a ceiling, the config's own
MAX_STEPS_CEILING = 1024


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {DAEMON_MODULE}", description=__doc__)
    p.add_argument("--runtime-dir", required=True, help="the folder of the daemon's socket, info and log")
    p.add_argument("--key", required=True, help="the daemon's identity (its files' names)")
    p.add_argument("--identity", default="{}", help="what the key is made of (JSON), for `dreamr daemon status`")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="exit after this long without a connection")
    add_model_flags(p)
    add_task_flag(p)  # the shipped demo's task (the client's --task, part of the daemon's identity)
    return p.parse_args(argv)


def base_config(reasoner: Reasoner) -> ReasonerConfig:
    """What ``dreamr reason --no-daemon`` starts from: the target's recommended verification, the
    rest defaults, the ceiling of steps; each request then applies its own flags
    (``client.RemoteEngine``)."""
    from dreamr_stream.config import ReasonerConfig

    return ReasonerConfig(verification=reasoner.config.verification).override(max_steps=MAX_STEPS_CEILING)


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds, so the files are removed even while the models load


class _ResidentSession(Session):
    """A connection of the daemon, which knows whether it has asked anything yet."""

    def __init__(self, ws: Connection, server: ResidentServer) -> None:
        super().__init__(ws, server)
        self.resident = server
        self.asked = False

    async def on_message(self, raw: str) -> None:
        # checked and set in one step with no await between: a request is either accepted before
        # the daemon began to exit, or refused (and so sent elsewhere by its client), never both
        if not self.asked and self.resident.closing:
            await self.ws.close(NOT_SERVED_CODE, NOT_SERVED_REASON)
            return
        self.asked = True
        await super().on_message(raw)


class ResidentServer(DreamrServer):
    """``dreamr serve``'s server, counting its open connections for the idle timeout.

    ``on_closing`` runs once, when the daemon decides to exit and before it refuses anyone: a
    client that is refused must find the daemon's files saying so, or it would wait for it."""

    def __init__(
        self, reasoner: Reasoner, settings: ServerSettings, on_closing: Callable[[], None] | None = None
    ) -> None:
        super().__init__(reasoner, settings)
        self.open_connections = 0
        self.last_closed = time.monotonic()
        self.closing = False
        self._on_closing = on_closing
        self._sessions: set[_ResidentSession] = set()

    def begin_closing(self) -> None:
        """From now on no request is accepted (``NOT_SERVED``); the running ones go on until ``stop``."""
        if not self.closing:
            self.closing = True
            if self._on_closing is not None:
                self._on_closing()

    async def handle(self, ws: Connection) -> None:
        # DreamrServer.handle runs a plain Session; this one counts, and refuses once closing
        if self.closing:  # the handshake finished after the daemon decided to exit: no hello
            await ws.close(NOT_SERVED_CODE, NOT_SERVED_REASON)
            return
        self.open_connections += 1
        session = _ResidentSession(ws, self)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            self.open_connections -= 1
            self.last_closed = time.monotonic()

    def idle_s(self) -> float:
        return 0.0 if self.open_connections else time.monotonic() - self.last_closed

    async def until_idle(self, timeout_s: float) -> None:
        """Returns once the server has had no connection for ``timeout_s``, closing (``begin_closing``)."""
        # a clock, not an event: polled about once a second, which is all an idle timeout needs
        while (idle := self.idle_s()) < timeout_s:  # noqa: ASYNC110
            await asyncio.sleep(min(1.0, max(0.05, timeout_s - idle)))
        # right after the check, with no await between: a connection whose handler starts later is
        # refused, rather than greeted by a daemon about to close it
        self.begin_closing()

    async def refuse_waiting(self) -> None:
        """Close the connections that have asked nothing (``NOT_SERVED``): their clients go elsewhere."""
        waiting = [s.ws for s in self._sessions if not s.asked]
        await asyncio.gather(*(ws.close(NOT_SERVED_CODE, NOT_SERVED_REASON) for ws in waiting))


def _settings(reasoner: Reasoner, files: DaemonFiles) -> ServerSettings:
    limits = reasoner.config.limits
    return ServerSettings(
        unix_path=str(files.socket),
        serve_page=False,
        max_message_bytes=(limits.max_image_bytes + 2) // 3 * 4 + 2**16,  # a largest image in base64, and the rest
        send_timeout_s=600.0,  # one user's terminal, which may be paused (Ctrl-S): no one else waits on it
    )


async def serve(reasoner: Reasoner, files: DaemonFiles, idle_timeout_s: float) -> None:
    """Serve until idle for ``idle_timeout_s`` or SIGTERM / SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    files.socket.unlink(missing_ok=True)  # a dead daemon's (the client checked it is dead)

    def on_closing() -> None:
        # no new client may find it from now on; one that does starts the next daemon once this one is gone
        files.write_info(state="stopping")
        files.socket.unlink(missing_ok=True)

    async with ResidentServer(reasoner, _settings(reasoner, files), on_closing) as server:
        files.write_info(state="ready")
        log.info("ready; exits after %g s idle", idle_timeout_s)
        idle = asyncio.create_task(server.until_idle(idle_timeout_s))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([idle, stopped], return_when=asyncio.FIRST_COMPLETED)
        log.info("idle for %g s: exiting" if idle.done() else "stopped by a signal: exiting", idle_timeout_s)
        idle.cancel()
        stopped.cancel()
        server.begin_closing()  # (the idle timeout has begun it already; a signal has not)
        await server.refuse_waiting()
        # leaving the block closes the other connections (1001): their running requests are cancelled


def _load(args: argparse.Namespace) -> Reasoner:
    check_device(args.device)
    t0 = time.perf_counter()
    # a copy of the draft here serves the first requests until the draft's own process is ready
    reasoner = load_reasoner(args, draft_stand_in=True)
    reasoner.config = base_config(reasoner)
    log.info("models loaded in %.2f s", time.perf_counter() - t0)
    return reasoner


def _run(args: argparse.Namespace, files: DaemonFiles) -> int:
    try:
        reasoner = _load(args)
    except UsageError as e:
        print(f"{USAGE_PREFIX}{e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except DreamrError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    try:
        asyncio.run(serve(reasoner, files, args.idle_timeout))
    finally:
        reasoner.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.umask(0o077)  # the socket, info and log: this user's only, from their creation
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_libraries()
    files = DaemonFiles(Path(args.runtime_dir), args.key)
    pid = os.getpid()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    files.write_info(
        merge=False,
        pid=pid,
        state="loading",
        started=time.time(),
        idle_timeout_s=args.idle_timeout,
        models=json.loads(args.identity),
        log=str(files.log),
    )
    try:
        return _run(args, files)
    finally:
        files.remove(pid)
        log.info("exited")


if __name__ == "__main__":
    exit_now(main())
