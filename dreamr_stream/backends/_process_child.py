"""The child's side of ``ProcessBackend``: build a backend, then serve its methods over a pipe.

Run as ``python -m dreamr_stream.backends._process_child FD`` by ``ProcessBackend``: the first
message on the socket ``FD`` is ``(factory, first_id)``; each later one is ``(op, threads, args,
kwargs)``, answered by ``("ok", (value, touched sessions), None)`` or ``("error", exception,
traceback)``, except ``close`` (fire-and-forget) and ``shutdown``. ``generate_batch``'s one
argument is its list of ``StepCall`` rows, each naming its session by id.

On ``shutdown`` (or when the parent goes) the child exits at once, without the interpreter's
teardown: with torch and transformers loaded that teardown took 1.2 s on the 2-core development
machine, which every program using a ``ProcessBackend`` waited for at its exit, and the child
holds nothing that needs it (the parent has every result).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any, cast

from dreamr_stream.backends.base import Batches, Capabilities, ModelBackend, Repairs, SetsThreads
from dreamr_stream.errors import BackendError

__all__ = ["BATCH_OP", "SESSION_OPS"]

log = logging.getLogger(__name__)

# methods whose first argument is a session (sent as its id)
SESSION_OPS = frozenset({"generate_step", "score", "append", "begin_step", "rollback", "fork", "close"})
# the op whose argument is a list of ``StepCall`` rows, each naming its session
BATCH_OP = "generate_batch"


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a BackendError carrying its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return BackendError(f"{type(e).__name__}: {e}")


def _operations(backend: ModelBackend[Any], caps: Capabilities) -> dict[str, Callable[..., Any]]:
    """The session operations the backend offers, by the name the parent sends."""
    ops: dict[str, Callable[..., Any]] = {
        "generate_step": backend.generate_step,
        "score": backend.score,
        "append": backend.append,
        "rollback": backend.rollback,
        "fork": backend.fork,
    }
    if caps.repair:
        ops["begin_step"] = cast(Repairs, backend).begin_step
    if caps.batches:
        ops[BATCH_OP] = cast(Batches, backend).generate_batch
    return ops


def _serve(conn: Connection, factory: Callable[[], ModelBackend[Any]], first_id: int) -> None:
    """The child's loop: build the backend, then answer requests until shutdown or EOF.
    Session ids count from ``first_id`` (the parent's numbering of its children)."""
    try:
        backend = factory()
        caps = backend.capabilities
        # the identity computed here, once: the parent gets plain values
        info = {"name": backend.name, "judge": backend.judge, "capabilities": caps.but(identity=caps.identity)}
    except BaseException as e:
        with contextlib.suppress(OSError):  # the parent may be gone already
            conn.send(("error", _portable(e), traceback.format_exc()))
        return
    ops = _operations(backend, caps)
    threaded = cast(SetsThreads, backend) if caps.sets_threads else None
    try:
        conn.send(("ok", info, None))
    except OSError:  # the parent went while this child was building: nobody to serve
        return
    sessions: dict[int, Any] = {}
    ids = itertools.count(first_id)

    def state(sid: int) -> tuple[int, int, bool]:
        s = sessions[sid]
        return sid, s.length, s.finished

    while True:
        try:
            op, threads, args, kwargs = conn.recv()
        except (EOFError, OSError):
            break
        if op == "shutdown":
            break
        try:
            if threads and threaded is not None:
                threaded.use_threads(threads)
            if op == "open_session":
                sid = next(ids)
                sessions[sid] = backend.open_session(*args, **kwargs)
                reply: Any = (None, [state(sid)])
            elif op == BATCH_OP:
                (rows,) = args
                if op not in ops:
                    raise BackendError(f"{backend.name}: this backend cannot batch steps (see its capabilities)")
                missing = [c.session for c in rows if c.session not in sessions]
                if missing:
                    raise BackendError(f"{op}: no sessions {missing} in the backend process (closed?)")
                value = ops[op]([replace(c, session=sessions[c.session]) for c in rows])
                reply = (value, [state(c.session) for c in rows])
            elif op in SESSION_OPS:
                sid, *rest = args
                if sid not in sessions:
                    raise BackendError(f"{op}: no session {sid} in the backend process (closed?)")
                session = sessions[sid]
                if op == "close":
                    del sessions[sid]
                    backend.close(session)
                    continue  # fire-and-forget: no reply
                if op not in ops:
                    raise BackendError(
                        f"{backend.name}: {op} is not an operation of this backend (see its capabilities)"
                    )
                value = ops[op](session, *rest, **kwargs)
                touched = [state(sid)]
                if op == "fork":
                    new = next(ids)
                    sessions[new] = value
                    value = None
                    touched.append(state(new))
                reply = (value, touched)
            else:
                raise BackendError(f"unknown backend operation {op!r}")
            conn.send(("ok", reply, None))
        except BaseException as e:
            if op == "close":
                log.warning("closing a session in the backend process failed: %s", e)
                continue
            conn.send(("error", _portable(e), traceback.format_exc()))


def _child_main(fd: int) -> None:
    conn = Connection(fd)
    try:
        factory, first_id = conn.recv()
    except (EOFError, OSError):
        return
    _serve(conn, factory, first_id)


def _exit_now() -> None:
    """Exit without the interpreter's teardown (see the module's docstring)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
    _exit_now()
