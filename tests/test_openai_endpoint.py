"""The OpenAI-compatible endpoint of a real ``dreamr serve`` (its own process, the shipped demo
models), driven by the clients people use against it: the ``openai`` SDK (sync and async, stream
and not) and LangChain's ``ChatOpenAI``. Nothing here is mocked: the chunks are parsed by the
SDK's own types, and the answers are compared with what ``/ws`` answers on the same server."""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from websockets.asyncio.client import connect

from dreamr_stream.tasks import get_task

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # serve_process: a server as users start it
serve_process = importlib.import_module("serve_process")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TOKEN = "openai-endpoint-test-token"
PER_ADDRESS = 6  # connections one address may hold: the "too many clients" case opens one more
GRID = get_task("grid")
ITEMS = [GRID.item("test", 900 + i) for i in range(2)]


def data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_message(item: Any) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(item.image)}},
            {"type": "text", "text": item.question},
        ],
    }


class Served:
    def __init__(self, process: Any) -> None:
        self.process = process
        self.base_url = f"http://127.0.0.1:{process.port}/v1"
        self.model = "dreamr-grid"
        self._ws_answers: dict[int, str] = {}

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=TOKEN, max_retries=0, timeout=120, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=TOKEN, max_retries=0, timeout=120)

    def ws_answer(self, index: int) -> str:
        """What ``/ws`` answers for ``ITEMS[index]`` on this server (greedy: the same every time)."""
        if index not in self._ws_answers:
            self._ws_answers[index] = asyncio.run(self._ask_ws(ITEMS[index]))
        return self._ws_answers[index]

    async def _ask_ws(self, item: Any) -> str:
        url = f"ws://127.0.0.1:{self.process.port}/ws"
        async with connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, max_size=None) as ws:
            await ws.recv()  # hello
            ask = {"v": 1, "type": "ask", "image": data_url(item.image), "question": item.question}
            await ws.send(json.dumps(ask))
            while (m := json.loads(await ws.recv()))["type"] not in ("stats", "error"):
                if m["type"] == "answer":
                    answer = str(m["answer"])
            assert m["type"] == "stats", m
            return answer

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"http://127.0.0.1:{self.process.port}/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def wait_idle(self, within_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while True:
            s = self.stats()
            if s["engine_requests"] == s["in_flight"] == s["active_requests"] == s["queued"] == 0:
                return s
            assert time.monotonic() < deadline, f"requests still running: {s}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("openai") / "server.log"
    flags = ["--token", TOKEN, "--max-connections-per-address", str(PER_ADDRESS), "--requests-per-minute", "0"]
    process = serve_process.start_server(flags, log)
    yield Served(process)
    code, _, by_itself = process.stop()
    assert by_itself and code == 0, log.read_text()[-2000:]


def same_answer(content: str, reference: str) -> bool:
    """The content is the answer itself, as ``ainvoke`` and ``/ws`` give it."""
    return bool(reference) and content == reference


# ---------------------------------------------------------------------------------- the SDK


def test_the_token_is_never_printed_whole(served: Served) -> None:
    assert TOKEN not in served.process.banner and TOKEN[:4] in served.process.banner


def test_models_lists_one_model_per_task(served: Served) -> None:
    # `dreamr serve` on the shipped models serves every task that ships them, the default first
    assert [m.id for m in served.client().models.list()] == [served.model, "dreamr-charts"]


def test_the_ordinary_streaming_loop_prints_verified_steps_then_the_answer(served: Served) -> None:
    reasoning: list[str] = []
    content: list[str] = []
    finish: list[str] = []
    stream = served.client().chat.completions.create(
        model=served.model, messages=[user_message(ITEMS[0])], stream=True, stream_options={"include_usage": True}
    )
    usage = None
    for chunk in stream:  # the loop a script written for vLLM runs, unchanged
        ChatCompletionChunk.model_validate(chunk.model_dump())
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning"):
            assert extra.get("reasoning_content") == extra["reasoning"]  # the older name, for older clients
            assert extra["dreamr"]["type"] in ("verified", "fallback")  # the /ws message of the step
            assert extra["dreamr"]["step"]["source"] in ("draft", "target", "cache")
            reasoning.append(extra["reasoning"])
        if delta.content:
            content.append(delta.content)
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    assert len(reasoning) >= 2 and finish == ["stop"]
    assert same_answer("".join(content), served.ws_answer(0))
    assert usage is not None and usage.completion_tokens_details is not None
    assert 0 < usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens


def test_non_stream_puts_the_steps_in_reasoning_and_the_answer_in_content(served: Served) -> None:
    completion = served.client().chat.completions.create(model=served.model, messages=[user_message(ITEMS[1])])
    ChatCompletion.model_validate(completion.model_dump())
    message = completion.choices[0].message
    extra = message.model_extra or {}
    assert extra["reasoning"] and extra["reasoning_content"] == extra["reasoning"]
    assert message.content is not None and same_answer(message.content, served.ws_answer(1))
    assert completion.choices[0].finish_reason == "stop" and completion.usage is not None


def test_async_client_stream_and_not(served: Served) -> None:
    async def both() -> tuple[str, str]:
        async with served.async_client() as client:
            streamed: list[str] = []
            stream = await client.chat.completions.create(
                model=served.model, messages=[user_message(ITEMS[0])], stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    streamed.append(chunk.choices[0].delta.content)
            whole = await client.chat.completions.create(model=served.model, messages=[user_message(ITEMS[0])])
            return "".join(streamed), whole.choices[0].message.content or ""

    streamed, whole = asyncio.run(both())
    assert same_answer(streamed, served.ws_answer(0)) and same_answer(whole, served.ws_answer(0))


def test_dreamr_options_travel_as_extra_body(served: Served) -> None:
    completion = served.client().chat.completions.create(
        model=served.model, messages=[user_message(ITEMS[0])], extra_body={"method": "target_only", "cache": False}
    )
    extra = completion.choices[0].message.model_extra or {}
    assert same_answer(completion.choices[0].message.content or "", served.ws_answer(0))
    assert extra["reasoning"]


def test_closing_the_stream_cancels_the_request_at_once(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model=served.model, messages=[user_message(ITEMS[1])], stream=True, extra_body={"cache": False}
    )
    for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.model_extra or {}).get("reasoning"):
            break  # a step arrived: model calls are running
    stream.close()
    t0 = time.monotonic()
    served.wait_idle(within_s=5.0)
    assert time.monotonic() - t0 < 5.0


# ---------------------------------------------------------------------------------- LangChain


def test_chat_openai_invokes_and_streams(served: Served) -> None:
    chat = ChatOpenAI(base_url=served.base_url, api_key=TOKEN, model=served.model, max_retries=0, timeout=120)
    item = ITEMS[0]
    message = HumanMessage(
        content=[
            {"type": "text", "text": item.question},
            {"type": "image_url", "image_url": {"url": data_url(item.image)}},
        ]
    )
    answer = chat.invoke([message])
    assert isinstance(answer.content, str) and same_answer(answer.content, served.ws_answer(0))
    streamed = "".join(str(chunk.content) for chunk in chat.stream([message]))
    assert same_answer(streamed, served.ws_answer(0))


# ---------------------------------------------------------------------------------- refusals


def _error(e: openai.APIStatusError) -> dict[str, Any]:
    body = e.response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    error: dict[str, Any] = body["error"]
    return error


def _refused(served: Served, exc: type[openai.APIStatusError], status: int, **kw: Any) -> dict[str, Any]:
    api_key = kw.pop("api_key", TOKEN)
    client = openai.OpenAI(base_url=served.base_url, api_key=api_key, max_retries=0, timeout=120)
    create = dict(kw)
    create.setdefault("model", served.model)
    with pytest.raises(exc) as info:
        client.chat.completions.create(**create)
    assert info.value.status_code == status
    return _error(info.value)


def test_every_bad_input_gets_its_status_and_error_object(served: Served) -> None:
    item = ITEMS[0]

    def with_image(url: str) -> list[dict[str, Any]]:
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": item.question}]
        return [{"role": "user", "content": parts}]

    bad = openai.BadRequestError
    _refused(served, bad, 400, messages=[{"role": "user", "content": item.question}])  # no image
    assert "data:" in _refused(served, bad, 400, messages=with_image("/etc/passwd"))["message"]
    assert "data:" in _refused(served, bad, 400, messages=with_image("https://example.com/a.png"))["message"]
    not_an_image = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    _refused(served, bad, 400, messages=with_image(not_an_image))
    assert "temperature" in _refused(served, bad, 400, messages=[user_message(item)], temperature=0.7)["message"]
    assert _refused(served, bad, 400, messages=[user_message(item)], extra_body={"tau": "high"})["param"]
    error = _refused(served, openai.NotFoundError, 404, messages=[user_message(item)], model="gpt-4o")
    assert error["code"] == "model_not_found"
    _refused(served, openai.AuthenticationError, 401, messages=[user_message(item)], api_key="wrong-token-123")
    oversize = "data:image/png;base64," + "A" * (9 * 2**20)
    with pytest.raises(openai.APIStatusError) as info:
        served.client().chat.completions.create(model=served.model, messages=with_image(oversize))
    assert info.value.status_code in (400, 413)
    _error(info.value)
    # and the server keeps serving
    completion = served.client().chat.completions.create(model=served.model, messages=[user_message(item)])
    assert same_answer(completion.choices[0].message.content or "", served.ws_answer(0))


def test_too_many_clients_from_one_address_get_429_with_retry_after(served: Served) -> None:
    body = {"model": served.model, "messages": [user_message(ITEMS[1])], "stream": True, "cache": False}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=served.base_url, headers=headers, timeout=120) as http:
        held = [http.stream("POST", "/chat/completions", json=body) for _ in range(PER_ADDRESS)]
        responses = [h.__enter__() for h in held]  # each holds its connection while it streams
        try:
            assert all(r.status_code == 200 for r in responses)
            refused = http.post("/chat/completions", json=body)
            assert refused.status_code == 429 and "retry-after" in refused.headers
            assert refused.json()["error"]["type"]
        finally:
            for h in held:
                h.__exit__(None, None, None)
    served.wait_idle()


def test_the_example_script_prints_steps_and_the_answer(served: Served) -> None:
    example = Path(__file__).parents[1] / "examples" / "openai_client.py"
    done = subprocess.run(
        [sys.executable, str(example), "--base-url", served.base_url, "--api-key", TOKEN],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("[draft ]") for line in lines) and lines[-1].startswith("answer: ")
