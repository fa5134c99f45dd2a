"""Batched draft steps: ``generate_batch`` decodes many sessions' steps together, and every
output and every session afterwards is exactly what ``generate_step`` alone gives; the model
runner gathers concurrent step calls into such batches.

On the shipped SAPO draft (grid puzzles) and on tiny random models built in-process."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
from families import FAMILIES, build_family

from dreamr_stream import tasks
from dreamr_stream.backends import hf_batch
from dreamr_stream.backends.base import Capabilities, StepCall, StepOutput
from dreamr_stream.backends.hf import HFSession, TransformersBackend
from dreamr_stream.backends.process import ProcessBackend, RemoteSession
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import ReasonerConfig
from dreamr_stream.engine.calls import write_step
from dreamr_stream.engine.request import RequestContext
from dreamr_stream.engine.runner import ModelRunner, PriorityLock
from dreamr_stream.errors import BackendError

STOP = "\n"
ITEMS = list(tasks.items("grid", "test", 16))
CACHE_TOL = 1e-5


@pytest.fixture(scope="module")
def shipped() -> TransformersBackend:
    """The shipped SAPO draft (LLaVA, 2-layer 128-wide llama), in float32 on the CPU."""
    return TransformersBackend.from_pretrained(demo_paths("sapo").draft, device="cpu", name="draft")


def open_twins(backend: Any, n: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Two identical sets of ``n`` sessions on grid puzzles, at different lengths: some fresh,
    some mid-step, some a step or more in."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        item = ITEMS[i % len(ITEMS)]
        pair = [backend.open_session(item.image, item.question) for _ in range(2)]
        warm = [rng.choice([None, 2, 5]) for _ in range(i % 3)]
        for s in pair:
            for budget in warm:
                backend.generate_step(s, max_tokens=96, stop=STOP, budget=budget)
        pairs.append(pair)
    return [a for a, _ in pairs], [b for _, b in pairs]


def assert_same_session(a: HFSession, b: HFSession) -> None:
    assert (a.ids, a.partial, a.finished, a.proposal, a.proposal_at) == (
        b.ids,
        b.partial,
        b.finished,
        b.proposal,
        b.proposal_at,
    )
    assert a.cache.get_seq_length() == b.cache.get_seq_length() == len(a.ids)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        assert la.keys.shape == lb.keys.shape and la.values.shape == lb.values.shape
        assert torch.allclose(la.keys, lb.keys, atol=CACHE_TOL) and torch.allclose(la.values, lb.values, atol=CACHE_TOL)
    assert sorted(a.logits_at) == sorted(b.logits_at)
    for n, logits in a.logits_at.items():
        assert torch.allclose(logits, b.logits_at[n], atol=1e-4)


def single(backend: Any, c: StepCall, session: Any) -> StepOutput:
    out: StepOutput = backend.generate_step(
        session, max_tokens=c.max_tokens, stop=c.stop, temperature=c.temperature, budget=c.budget
    )
    return out


@pytest.fixture
def batched_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every batched forward made (a spy on ``PaddedCache.forward``)."""
    rows: list[int] = []
    forward = hf_batch.PaddedCache.forward

    def spy(self: hf_batch.PaddedCache, model: Any, tokens: list[int]) -> torch.Tensor:
        rows.append(len(tokens))
        return forward(self, model, tokens)

    monkeypatch.setattr(hf_batch.PaddedCache, "forward", spy)
    return rows


def run_rounds(backend: Any, n: int, rounds: int, seed: int, max_tokens: tuple[int, ...] = (6, 12, 96)) -> None:
    """Random rounds of ``generate_batch`` on one set of sessions and the same calls one by one
    on its twin: rows join and leave between rounds, with different budgets and step caps."""
    batched, alone = open_twins(backend, n, seed)
    rng = random.Random(seed)
    for r in range(rounds):
        chosen = [i for i in range(n) if i == r % n or rng.random() < 0.75]
        budgets = [rng.choice([None, 3, 8, 8]) for _ in chosen]
        caps = [rng.choice(max_tokens) for _ in chosen]
        calls = [StepCall(batched[i], m, STOP, 0.0, b) for i, m, b in zip(chosen, caps, budgets, strict=True)]
        outs = backend.generate_batch(calls)
        expected = [single(backend, c, alone[i]) for i, c in zip(chosen, calls, strict=True)]
        assert outs == expected, f"round {r}"
        for a, b in zip(batched, alone, strict=True):
            assert_same_session(a, b)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_batched_greedy_steps_equal_single_steps_on_the_shipped_draft(
    shipped: TransformersBackend, batched_forwards: list[int], n: int
) -> None:
    run_rounds(shipped, n, rounds=10, seed=n)
    if n > 1:  # the rows did go through batched forwards, several at a time
        assert batched_forwards and max(batched_forwards) >= min(n, 3)


def test_batched_steps_equal_single_steps_with_eager_attention(batched_forwards: list[int]) -> None:
    """SDPA takes the padding as a boolean 4-D mask; another attention gets the 2-D mask."""
    eager = TransformersBackend.from_pretrained(demo_paths("sapo").draft, device="cpu", name="draft")
    eager.model.set_attn_implementation("eager")
    run_rounds(eager, 6, rounds=5, seed=6)
    assert batched_forwards and max(batched_forwards) >= 3


def test_sessions_after_a_batch_score_append_and_roll_back_as_after_single_steps(shipped: TransformersBackend) -> None:
    batched, alone = open_twins(shipped, 6, seed=3)
    for sessions in (batched, alone):  # whole steps, so that scoring may follow
        for s in sessions:
            if s.partial:
                shipped.rollback(s, len(s.partial))
    calls = [StepCall(s, 96, STOP) for s in batched]
    assert shipped.generate_batch(calls) == [single(shipped, c, s) for c, s in zip(calls, alone, strict=True)]
    for a, b in zip(batched, alone, strict=True):
        assert_same_session(a, b)
        ref = shipped.reference_logits(a)  # the batched session's cache equals a fresh forward
        assert float((ref[-1] - a.logits_at[a.length]).abs().max()) < 1e-4
        scores = [shipped.score(s, "Row 2: empty, empty, empty.", stop=STOP, judge=shipped.judge) for s in (a, b)]
        assert scores[0].n_tokens == scores[1].n_tokens and scores[0].agreed == scores[1].agreed
        assert abs(scores[0].p_pos - scores[1].p_pos) < 1e-5 and abs(scores[0].p_neg - scores[1].p_neg) < 1e-5
        assert scores[0].token_logprobs == pytest.approx(scores[1].token_logprobs, abs=1e-4)
        for s, score in zip((a, b), scores, strict=True):
            shipped.rollback(s, score.n_tokens)
            shipped.append(s, "Row 2: empty, blue circle, empty.", stop=STOP)
        assert_same_session(a, b)
    calls = [StepCall(s, 96, STOP, budget=8) for s in batched]
    assert shipped.generate_batch(calls) == [single(shipped, c, s) for c, s in zip(calls, alone, strict=True)]
    for a, b in zip(batched, alone, strict=True):
        assert_same_session(a, b)


def test_rows_in_an_unusual_state_run_alone_with_generate_steps_semantics(shipped: TransformersBackend) -> None:
    batched, alone = open_twins(shipped, 8, seed=5)
    for sessions in (batched, alone):
        shipped.rollback(sessions[0], len(sessions[0].partial))
        shipped.begin_step(sessions[0], "Row 1:", proposal=" empty, blue circle, empty.")  # a pending proposal
        for _ in range(30):  # an answer that has ended
            if sessions[1].finished:
                break
            shipped.generate_step(sessions[1], max_tokens=96, stop=STOP)
        shipped.rollback(sessions[2], len(sessions[2].partial))
        shipped.generate_step(sessions[2], max_tokens=96, stop=STOP, budget=4)  # a begun step past its cap below
        assert sessions[1].finished and len(sessions[2].partial) == 4
    calls_of = [
        lambda s: StepCall(s[0], 96, STOP, budget=8),
        lambda s: StepCall(s[1], 96, STOP, budget=8),
        lambda s: StepCall(s[2], 3, STOP, budget=8),
        lambda s: StepCall(s[3], 96, STOP, temperature=0.8, budget=8),  # sampled, with the session's own generator
        lambda s: StepCall(s[4], 96, STOP, budget=0),
        lambda s: StepCall(s[5], 96, STOP, budget=3),  # named twice: both alone, in order
        lambda s: StepCall(s[5], 96, STOP, budget=3),
        lambda s: StepCall(s[6], 96, STOP, budget=8),
        lambda s: StepCall(s[7], 96, STOP, budget=8),
    ]
    calls = [f(batched) for f in calls_of]
    assert hf_batch.rows_to_batch(calls) == [7, 8]
    outs = shipped.generate_batch(calls)
    # one by one, the batched rows first (as generate_batch runs them), then the rest in order
    order = [7, 8, 0, 1, 2, 3, 4, 5, 6]
    expected = {i: single(shipped, calls_of[i](alone), calls_of[i](alone).session) for i in order}
    assert outs == [expected[i] for i in range(len(calls))]
    for a, b in zip(batched, alone, strict=True):
        assert_same_session(a, b)


def test_batched_steps_equal_single_steps_on_tiny_random_models(tiny_pair) -> None:  # type: ignore[no-untyped-def]
    for backend in tiny_pair:  # a 3-layer target and a 1-layer draft
        run_rounds(backend, 6, rounds=5, seed=11, max_tokens=(4, 8))


@pytest.fixture(
    scope="module", params=[f for f in FAMILIES if f.name in ("idefics3", "qwen2_vl")], ids=lambda f: f.name
)
def family_backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TransformersBackend:
    folder = tmp_path_factory.mktemp(request.param.name)
    build_family(request.param, folder)
    return TransformersBackend.from_pretrained(folder, device="cpu")


def test_other_families_batch_or_run_alone_and_give_the_same_steps(family_backend: TransformersBackend) -> None:
    run_rounds(family_backend, 4, rounds=4, seed=2, max_tokens=(4, 6))
    s = family_backend.open_session(ITEMS[0].image, ITEMS[0].question)
    # Qwen2-VL's 3-D positions (rope deltas per session) are not batched: its rows run alone
    assert hf_batch.batchable(StepCall(s, 6, STOP)) == (s.rope_deltas is None)


# ---------------------------------------------------------------------------- the model runner
def context(runner: ModelRunner) -> RequestContext:
    async def emit(event: Any) -> None:
        return None

    return RequestContext(
        config=ReasonerConfig(), question="", method="draft_only", emit=emit, target=None, draft=runner
    )


async def write_steps(runner: ModelRunner, session: Any, n: int, out: list[StepOutput]) -> None:
    """``n`` whole steps on ``session``, each in chunks (``write_step``), as a draft lane writes them."""
    ctx = context(runner)
    for k in range(n):
        step = await write_step(ctx, runner, session, index=k, lane="draft")
        out.append(step)
        if step.eos:
            return


@pytest.mark.asyncio
async def test_concurrent_write_steps_are_batched_and_equal_one_by_one(shipped: TransformersBackend) -> None:
    runner = ModelRunner(shipped, "draft")
    assert runner.batches == shipped.capabilities.batches > 1
    batched, alone = open_twins(shipped, 16, seed=7)
    one_by_one: list[list[StepOutput]] = [[] for _ in alone]
    for s, out in zip(alone, one_by_one, strict=True):
        await write_steps(runner, s, 3, out)
    calls_one_by_one, runner.calls = runner.calls, 0
    assert runner.batched_steps == 0
    together: list[list[StepOutput]] = [[] for _ in batched]
    async with anyio.create_task_group() as tg:
        for s, out in zip(batched, together, strict=True):
            tg.start_soon(write_steps, runner, s, 3, out)
    assert [[o.text for o in steps] for steps in together] == [[o.text for o in steps] for steps in one_by_one]
    assert together == one_by_one  # token and forward counts too
    for a, b in zip(batched, alone, strict=True):
        assert_same_session(a, b)
    assert runner.batched_steps > 0 and runner.calls < calls_one_by_one / 3, (runner.calls, calls_one_by_one)
    assert runner.in_flight == 0 and not runner.lock.locked


@pytest.mark.asyncio
async def test_cancelling_one_request_leaves_the_others_steps_unchanged(shipped: TransformersBackend) -> None:
    runner = ModelRunner(shipped, "draft")
    batched, alone = open_twins(shipped, 8, seed=9)
    one_by_one: list[list[StepOutput]] = [[] for _ in alone]
    for s, out in zip(alone, one_by_one, strict=True):
        await write_steps(runner, s, 3, out)
    together: list[list[StepOutput]] = [[] for _ in batched]
    victim = 3
    left_at: list[int] = []

    async def victim_request(scope: anyio.CancelScope) -> None:
        with scope:
            await write_steps(runner, batched[victim], 3, together[victim])
        left_at.append(batched[victim].length)

    async def cancel_after_first_step(scope: anyio.CancelScope) -> None:
        while not together[victim]:
            await anyio.lowlevel.checkpoint()
        for _ in range(3):  # into its next step's chunks
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        for i, (s, out) in enumerate(zip(batched, together, strict=True)):
            if i != victim:
                tg.start_soon(write_steps, runner, s, 3, out)
        tg.start_soon(victim_request, scope)
        tg.start_soon(cancel_after_first_step, scope)
    assert scope.cancelled_caught
    others = [i for i in range(len(batched)) if i != victim]
    assert [together[i] for i in others] == [one_by_one[i] for i in others]
    assert batched[victim].length == left_at[0]  # nothing wrote its session after its caller left


@pytest.mark.asyncio
async def test_the_lock_holder_gathers_waiting_items_in_priority_then_arrival_order() -> None:
    lock = PriorityLock()
    assert await lock.acquire()
    got: dict[str, bool] = {}

    async def wait(name: str, priority: int, item: object) -> None:
        got[name] = await lock.acquire(priority, item)

    async with anyio.create_task_group() as tg:
        for name, priority in (("a", 1), ("b", 0), ("other", 0), ("c", 1), ("d", 0)):
            tg.start_soon(wait, name, priority, name if name != "other" else None)
            await anyio.lowlevel.checkpoint()
        assert lock.gather(lambda item: isinstance(item, str), 3) == ["b", "d", "a"]
        await anyio.lowlevel.checkpoint()
        assert got == {"b": False, "d": False, "a": False}  # served by the holder: none holds the lock
        lock.release()  # to "other" (priority 0), then "c"
        await anyio.lowlevel.checkpoint()
        assert got["other"] is True and "c" not in got
        lock.release()
    assert got["c"] is True and lock.locked
    lock.release()
    assert not lock.locked


class Gated:
    """A backend whose step calls each wait for a turn (``go``), so a test can act while one runs."""

    def __init__(self, inner: TransformersBackend, fail_batches: bool = False) -> None:
        self.inner, self.name, self.judge = inner, inner.name, inner.judge
        self.fail_batches = fail_batches
        self.turns = threading.Semaphore(0)
        self.running = threading.Event()
        self.batches: list[int] = []  # rows of each batch, when it ended

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def _wait(self) -> None:
        self.running.set()
        assert self.turns.acquire(timeout=30)
        self.running.clear()

    def generate_step(self, session: Any, **kwargs: Any) -> StepOutput:
        self._wait()
        return self.inner.generate_step(session, **kwargs)

    def generate_batch(self, calls: list[StepCall]) -> list[StepOutput]:
        self._wait()
        try:
            if self.fail_batches:
                raise RuntimeError("injected batch failure")
            return self.inner.generate_batch(calls)
        finally:
            self.batches.append(len(calls))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def until(flag: threading.Event) -> None:
    with anyio.fail_after(30):
        while not flag.is_set():  # noqa: ASYNC110 - set by a worker thread
            await anyio.sleep(0.005)


@pytest.mark.asyncio
async def test_a_caller_cancelled_while_waiting_leaves_the_queue_and_one_in_a_running_batch_waits_for_it(
    shipped: TransformersBackend,
) -> None:
    gated = Gated(shipped)
    runner = ModelRunner(gated, "draft")
    batched, alone = open_twins(shipped, 4, seed=1)
    lengths = [s.length for s in batched]
    outs: dict[int, StepOutput] = {}
    seen_batches: dict[int, int] = {}  # batches ended when each caller left

    async def step(i: int, scope: anyio.CancelScope) -> None:
        with scope:
            outs[i] = await runner.generate_step(batched[i], max_tokens=96, stop=STOP, budget=8)
        seen_batches[i] = len(gated.batches)

    scopes = [anyio.CancelScope() for _ in batched]
    async with anyio.create_task_group() as tg:
        tg.start_soon(step, 0, scopes[0])
        await until(gated.running)  # 0 runs alone; 1, 2 and 3 wait
        for i in (1, 2, 3):
            tg.start_soon(step, i, scopes[i])
        await anyio.sleep(0.05)
        scopes[2].cancel()  # waiting: leaves the queue at once
        await anyio.sleep(0.05)
        assert 2 in seen_batches and 2 not in outs and batched[2].length == lengths[2]
        gated.turns.release()  # 0 ends; 1 and 3 go as one batch
        with anyio.fail_after(30):
            while not (gated.running.is_set() and 0 in outs):  # noqa: ASYNC110 - a worker thread's flag
                await anyio.sleep(0.005)
        scopes[3].cancel()  # its batch runs: it waits for the batch, then leaves
        await anyio.sleep(0.05)
        assert 3 not in seen_batches
        gated.turns.release()
    assert gated.batches == [2]
    assert seen_batches[3] == 1 and 3 not in outs and scopes[3].cancelled_caught
    assert batched[2].length == lengths[2]  # never ran
    for i in (0, 1, 3):  # the batch decoded the cancelled caller's row too, as generate_step would have
        expected = single(shipped, StepCall(alone[i], 96, STOP, budget=8), alone[i])
        if i in outs:
            assert outs[i] == expected
        assert_same_session(batched[i], alone[i])


@pytest.mark.asyncio
async def test_a_failing_batch_raises_backend_error_to_each_of_its_callers(shipped: TransformersBackend) -> None:
    gated = Gated(shipped, fail_batches=True)
    runner = ModelRunner(gated, "draft")
    sessions, _ = open_twins(shipped, 4, seed=2)
    results: dict[int, Any] = {}

    async def step(i: int) -> None:
        try:
            results[i] = await runner.generate_step(sessions[i], max_tokens=96, stop=STOP, budget=8)
        except BackendError as e:
            results[i] = e

    async with anyio.create_task_group() as tg:
        tg.start_soon(step, 0)
        await until(gated.running)
        for i in (1, 2, 3):
            tg.start_soon(step, i)
        await anyio.sleep(0.05)
        gated.turns.release()
        await anyio.sleep(0.05)
        gated.turns.release()
    assert isinstance(results[0], StepOutput) and gated.batches == [3]
    for i in (1, 2, 3):
        assert isinstance(results[i], BackendError) and "injected batch failure" in str(results[i])
    assert not runner.lock.locked and runner.in_flight == 0


# ---------------------------------------------------------------------------- in a child process
@pytest.fixture(scope="module")
def remote() -> Iterator[ProcessBackend]:
    backend = ProcessBackend.from_pretrained(demo_paths("sapo").draft, name="draft")
    yield backend
    backend.shutdown()


def test_the_child_process_batches_in_one_message_with_the_same_steps(
    remote: ProcessBackend, shipped: TransformersBackend
) -> None:
    assert remote.capabilities.batches == shipped.capabilities.batches > 1
    rng = random.Random(4)
    there = [remote.open_session(item.image, item.question) for item in ITEMS[:8]]
    here = [shipped.open_session(item.image, item.question) for item in ITEMS[:8]]
    for _ in range(6):
        budgets = [rng.choice([None, 3, 8]) for _ in there]
        outs = remote.generate_batch([StepCall(s, 96, STOP, budget=b) for s, b in zip(there, budgets, strict=True)])
        assert outs == [
            shipped.generate_step(s, max_tokens=96, stop=STOP, budget=b) for s, b in zip(here, budgets, strict=True)
        ]
        assert [(s.length, s.finished) for s in there] == [(s.length, s.finished) for s in here]
    remote.close(there[0])
    with pytest.raises(BackendError, match="no sessions"):
        remote.generate_batch([StepCall(there[0], 96, STOP), StepCall(there[1], 96, STOP)])


def test_a_batch_of_stand_in_and_child_sessions_gives_the_same_steps(shipped: TransformersBackend) -> None:
    backend = ProcessBackend.from_pretrained(demo_paths("sapo").draft, name="draft", wait=False)
    try:
        backend.use_stand_in(TransformersBackend.from_pretrained(demo_paths("sapo").draft, name="draft"))
        early = [backend.open_session(item.image, item.question) for item in ITEMS[:3]]  # in the stand-in
        backend.ready()
        late = [backend.open_session(item.image, item.question) for item in ITEMS[3:6]]  # in the child
        assert not any(isinstance(s, RemoteSession) for s in early) and all(isinstance(s, RemoteSession) for s in late)
        here = [shipped.open_session(item.image, item.question) for item in ITEMS[:6]]
        mixed = [early[0], late[0], early[1], late[1], early[2], late[2]]
        order = [0, 3, 1, 4, 2, 5]
        for budget in (3, 8, None):
            outs = backend.generate_batch([StepCall(s, 96, STOP, budget=budget) for s in mixed])
            assert outs == [shipped.generate_step(here[i], max_tokens=96, stop=STOP, budget=budget) for i in order]
    finally:
        backend.shutdown()


@pytest.mark.asyncio
async def test_concurrent_write_steps_through_the_child_equal_in_process_ones(
    remote: ProcessBackend, shipped: TransformersBackend
) -> None:
    runner = ModelRunner(remote, "draft")
    assert runner.batches > 1 and runner.abandonable
    there = [remote.open_session(item.image, item.question) for item in ITEMS[8:16]]
    here = [shipped.open_session(item.image, item.question) for item in ITEMS[8:16]]
    local = ModelRunner(shipped, "draft")
    expected: list[list[StepOutput]] = [[] for _ in here]
    for s, out in zip(here, expected, strict=True):
        await write_steps(local, s, 2, out)
    got: list[list[StepOutput]] = [[] for _ in there]
    async with anyio.create_task_group() as tg:
        for s, out in zip(there, got, strict=True):
            tg.start_soon(write_steps, runner, s, 2, out)
    assert got == expected and runner.batched_steps > 0


def test_a_batch_cache_layer_writes_tokens_in_place_and_grows_when_full() -> None:
    layer = hf_batch.GrowingLayer()
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    buffers = torch.zeros(3, 2, 6, 4), torch.zeros(3, 2, 6, 4)  # room for one token
    buffers[0][:, :, :5], buffers[1][:, :, :5] = keys, values
    layer.hold(*buffers, 5)
    for _ in range(4):  # past the room: the buffers grow
        k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        out = layer.update(k, v)
        assert torch.equal(out[0], keys) and torch.equal(out[1], values) and layer.get_seq_length() == keys.shape[2]
    layer.select(torch.tensor([2, 0]), trim=1)
    assert torch.equal(layer.keys, keys[[2, 0], :, 1:]) and torch.equal(layer.values, values[[2, 0], :, 1:])


def test_a_backend_that_declares_nothing_does_not_batch() -> None:
    assert Capabilities(identity="x").batches == 0
