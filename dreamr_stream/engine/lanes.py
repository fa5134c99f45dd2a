"""The lanes that run beside FPSR's driver during an epoch (``engine.fpsr``).

* the draft lane writes each step it is permitted (``RequestPolicy``'s lookahead window) on the
  draft's session and reports it; it stops after a final step, and reports its failure;
* a fallback writes the target's own step on a fork of the target's session, at lower priority
  than verification, and says when it is done.

Both report on one channel per epoch, which the driver reads, so that nothing one epoch's lanes
said can reach the next epoch. ``EpochLanes`` runs them in a task of their own, from the
epoch's start until the driver stops them (cancels them and waits).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dreamr_stream.backends.base import Session
from dreamr_stream.engine import calls
from dreamr_stream.engine import policy as P
from dreamr_stream.engine import request_messages as RM
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.runner import ModelRunner, Priority
from dreamr_stream.errors import BackendError
from dreamr_stream.events import DraftedEvent
from dreamr_stream.types import StepCost

__all__ = ["Draft", "EpochLanes", "Fallback", "Lane", "Message", "draft_lane"]


@dataclass(frozen=True)
class Draft:
    """A step the draft lane wrote."""

    index: int
    text: str
    eos: bool


Message = RM.Observation | Draft  # what the lanes tell the driver
Lane = MemoryObjectSendStream[Message]


@dataclass
class Fallback:
    """The target writing its own step ``index`` on a fork of ``T``."""

    index: int
    session: Session | None = None
    text: str = ""
    eos: bool = False
    cost: StepCost = field(default_factory=StepCost)
    priority: int = Priority.FALLBACK
    finished: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    failure: BaseException | None = None

    async def run(self, ctx: RequestContext, fork: Session, lane: Lane) -> None:
        target = ctx.target
        assert target is not None
        self.session = fork
        try:
            with self.scope:
                out = await calls.write_step(
                    ctx,
                    target,
                    fork,
                    index=self.index,
                    lane="target",
                    priority=lambda: self.priority,  # raised to verification's once it is awaited
                    chunk=ctx.config.scheduling.fallback_chunk_tokens,
                )
                self.text, self.eos, self.cost = out.text, out.eos, calls.step_cost(out)
        except Exception as e:  # handed to the driver, which raises it
            self.failure = e
        finally:
            self.finished.set()
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                lane.send_nowait(P.FallbackDone(self.index))

    def cancel(self) -> None:
        self.scope.cancel()


async def draft_lane(
    ctx: RequestContext, session: Session, lane: Lane, permits: MemoryObjectReceiveStream[int], bounds: dict[int, int]
) -> None:
    """Write each permitted step on ``session``, in order, and hand it to the driver. A final
    step ends the reasoning, so nothing is written after one; a failure, a call past the
    draft's deadline included (``RequestContext.draft_calls``), is reported."""
    draft = ctx.draft
    assert draft is not None
    try:
        with ctx.draft_calls():
            await _write_permitted(ctx, draft, session, lane, permits, bounds)
    except BackendError as e:
        lane.send_nowait(RM.DraftFailed(str(e)))


async def _write_permitted(
    ctx: RequestContext,
    draft: ModelRunner,
    session: Session,
    lane: Lane,
    permits: MemoryObjectReceiveStream[int],
    bounds: dict[int, int],
) -> None:
    """The draft lane's work: each permitted step, written and handed on."""
    async for index in permits:
        bounds[index] = session.length  # where the step begins: a resync rolls back to it
        out = await calls.write_step(ctx, draft, session, index=index, lane="draft")
        await ctx.emit(DraftedEvent(index=index, text=out.text, elapsed_s=ctx.now()))
        lane.send_nowait(Draft(index, out.text, out.eos))
        if ctx.is_final(out.text, out.eos):
            return


class EpochLanes:
    """One epoch's lanes (the draft lane, the fallback) in a task of their own, the channel
    they report on, and the draft lane's permits."""

    def __init__(self) -> None:
        self.send, self.recv = anyio.create_memory_object_stream[Message](math.inf)
        self.permits, self.permitted = anyio.create_memory_object_stream[int](math.inf)
        self.scope = anyio.CancelScope()
        self.draft_scope = anyio.CancelScope()  # the draft lane's alone (``stop_draft``)
        self.stopped = anyio.Event()
        self.tg: TaskGroup

    async def run(
        self, ctx: RequestContext, session: Session, bounds: dict[int, int], *, task_status: TaskStatus[None]
    ) -> None:
        try:
            with self.scope:
                async with anyio.create_task_group() as self.tg:
                    self.tg.start_soon(self._draft, ctx, session, bounds)
                    task_status.started()
                    await anyio.sleep_forever()
        finally:
            self.stopped.set()

    async def _draft(self, ctx: RequestContext, session: Session, bounds: dict[int, int]) -> None:
        with self.draft_scope:
            await draft_lane(ctx, session, self.send, self.permitted, bounds)
        if self.draft_scope.cancelled_caught:  # stopped on its own: the lane writes no more
            with contextlib.suppress(anyio.ClosedResourceError):
                self.send.send_nowait(RM.DraftFailed("stopped: the request went on with the target alone"))

    def stop_draft(self) -> None:
        """Stop the draft lane mid-epoch (the request goes alone): it reports ``DraftFailed``, so
        that the epoch stops waiting for its drafts; the fallback, if any, goes on."""
        self.draft_scope.cancel()

    def drain(self) -> list[Message]:
        """What the lanes reported and the driver has not read yet."""
        out: list[Message] = []
        with contextlib.suppress(anyio.WouldBlock):
            while True:
                out.append(self.recv.receive_nowait())
        return out

    async def stop(self) -> list[Message]:
        """Cancel the lanes, wait for them, and return what they reported last."""
        self.scope.cancel()
        await self.stopped.wait()
        out = self.drain()
        self.close()
        return out

    def close(self) -> None:
        for stream in (self.send, self.recv, self.permits, self.permitted):
            stream.close()
