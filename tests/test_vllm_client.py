"""VLLMBackend's reading of the server's answers and its errors, over ``httpx.MockTransport``
(fast; the real server is ``test_vllm.py``): streamed steps and how they end, the candidate's
evidence and agreed start in ``prompt_logprobs``, verdicts in ``top_logprobs``, and a server that
fails, stalls or answers garbage, each a ``VLLMError`` naming its URL."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest
from dreamr_vllm import VLLMBackend, VLLMError
from PIL import Image

from dreamr_stream.backends.openai_compat import OpenAICompatBackend
from dreamr_stream.config import JudgeTemplate
from dreamr_stream.errors import ConfigError

URL = "http://127.0.0.1:9999/v1"
IMAGE = Image.new("RGB", (16, 16), (1, 2, 3))
Handler = Callable[[httpx.Request], httpx.Response]


def backend(handler: Handler, **kw: Any) -> VLLMBackend:
    return VLLMBackend(URL, model="target", transport=httpx.MockTransport(handler), **kw)


def sse(*chunks: dict[str, Any]) -> httpx.Response:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def delta(text: str, finish: str | None = None, stop_reason: Any = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish, "stop_reason": stop_reason}
    return {"choices": [choice]}


def token(piece: str, logprob: float, greedy: str | None = None) -> dict[str, Any]:
    """One prompt position: its own token, and the greedy one when that differs."""
    own = {"1": {"logprob": logprob, "rank": 1 if greedy is None else 7, "decoded_token": piece}}
    return own if greedy is None else {**own, "2": {"logprob": -0.1, "rank": 1, "decoded_token": greedy}}


@pytest.mark.asyncio
async def test_a_step_streams_until_the_delimiter_and_continues_the_assistant_message() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return sse(
            delta("Row 1: "), delta("red"), delta("", "stop", "\n"), {"choices": [], "usage": {"completion_tokens": 3}}
        )

    b = backend(handler)
    s = await b.open_session(IMAGE, "q?")
    await b.append(s, "Row 0: empty", stop="\n")
    out = await b.generate_step(s, max_tokens=32, stop="\n")
    assert (out.text, out.eos, out.new_tokens) == ("Row 1: red", False, 3)
    assert s.text == "Row 0: empty\nRow 1: red\n" and s.length == len(s.text)
    body = bodies[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "Row 0: empty\n"}
    assert body["continue_final_message"] and not body["add_generation_prompt"]
    assert body["stop"] == ["\n"] and body["stream"] and body["messages"][0]["content"][0]["type"] == "image_url"


@pytest.mark.asyncio
async def test_end_of_sequence_and_the_step_cap() -> None:
    replies = iter([sse(delta("Answer: 4", "stop", None)), sse(delta("a long step", "length"))])
    b = backend(lambda _: next(replies))
    s = await b.open_session(IMAGE, "q?")
    out = await b.generate_step(s, max_tokens=8, stop="\n")
    assert out.eos and s.finished and s.text == "Answer: 4"
    await b.rollback(s, len("Answer: 4"))
    out = await b.generate_step(s, max_tokens=8, stop="\n")
    assert not out.eos and s.text == "a long step\n"  # a capped step ends with a delimiter, as in process


@pytest.mark.asyncio
async def test_likelihood_evidence_and_the_agreed_start() -> None:
    positions = [None, token("<|assistant|>", 0.0), token("Row", -0.01), token(" 1", -0.02, greedy=" 2")]
    positions += [token(":", -0.5), token(" red", -0.03), token("\n", -9.0)]

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["prompt_logprobs"] == 1
        return httpx.Response(200, json={"choices": [{"message": {"content": "x"}}], "prompt_logprobs": positions})

    b = backend(handler)
    s = await b.open_session(IMAGE, "q?")
    out = await b.score(s, "Row 1: red", stop="\n", judge=None)
    assert out.token_logprobs == [-0.01, -0.02, -0.5, -0.03]  # the delimiter is not evidence
    assert out.agreed == "Row"  # the target would have written " 2" where the draft wrote " 1"
    assert out.n_tokens == len("Row 1: red\n") and s.text == "Row 1: red\n"
    await b.rollback(s, out.n_tokens)
    await b.begin_step(s, out.agreed)
    assert s.text == "" and s.partial == "Row"


@pytest.mark.asyncio
async def test_judge_evidence_from_top_logprobs() -> None:
    tops = [{"token": " yes", "logprob": -0.1}, {"token": " no", "logprob": -2.5}, {"token": "x", "logprob": -4.0}]

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["messages"][-1]["content"].endswith("Row 1\nCheck:") and body["top_logprobs"] == 20
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": [{"top_logprobs": tops}]}}]})

    b = backend(handler)
    s = await b.open_session(IMAGE, "q?")
    out = await b.score(s, "Row 1", stop="\n", judge=JudgeTemplate(suffix="Check:"))
    assert out.p_pos == pytest.approx(0.9048, abs=1e-4) and out.p_neg == pytest.approx(0.0821, abs=1e-4)
    assert s.text == "Row 1\n"  # the judge suffix is not kept


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (lambda: httpx.Response(500, text="engine dead"), "HTTP 500: engine dead"),
        (lambda: httpx.Response(200, text="<html>proxy error</html>"), "not JSON"),
        (lambda: httpx.Response(200, json={"object": "error"}), "no choices"),
        (lambda: httpx.Response(200, json={"choices": [{}], "prompt_logprobs": None}), "no prompt_logprobs"),
    ],
)
async def test_a_bad_scoring_answer_is_a_typed_error_naming_the_url(
    reply: Callable[[], httpx.Response], match: str
) -> None:
    b = backend(lambda _: reply())
    s = await b.open_session(IMAGE, "q?")
    with pytest.raises(VLLMError, match=match) as info:
        await b.score(s, "Row 1", stop="\n", judge=None)
    assert URL in str(info.value)


@pytest.mark.asyncio
async def test_a_stalled_or_broken_stream_is_a_typed_error() -> None:
    def stalled(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no bytes for 60 s", request=request)

    for handler, match in (
        (stalled, "ReadTimeout"),
        (lambda _: sse(delta("Row 1")), "without a finish reason"),
        (lambda _: httpx.Response(200, text="data: {oops\n\n"), "not JSON"),
    ):
        b = backend(handler)
        s = await b.open_session(IMAGE, "q?")
        with pytest.raises(VLLMError, match=match) as info:
            await b.generate_step(s, max_tokens=8, stop="\n")
        assert URL in str(info.value)


@pytest.mark.asyncio
async def test_the_model_name_comes_from_the_server_when_not_given() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]})

    b = VLLMBackend(URL, transport=httpx.MockTransport(handler))
    with pytest.raises(VLLMError, match="serves \\['a', 'b'\\]; pass model="):
        await b.resolve_model()


class OtherServer(OpenAICompatBackend):
    """Another server's dialect (SGLang-like): how to continue a message and read an end."""

    kind = "other"

    def continuation(self, continuing: bool) -> dict[str, Any]:
        return {"continue_final_message": continuing}

    def ended_at_eos(self, choice: Mapping[str, Any]) -> bool:
        return choice.get("finish_reason") == "stop" and not isinstance(choice.get("matched_stop"), str)


@pytest.mark.asyncio
async def test_another_server_is_a_small_subclass_of_the_openai_compatible_base() -> None:
    tops = [{"token": " yes", "logprob": -0.1}, {"token": " no", "logprob": -2.5}]
    replies = iter(
        [
            sse({"choices": [{"delta": {"content": "Row 1"}, "finish_reason": "stop", "matched_stop": "\n"}]}),
            httpx.Response(200, json={"choices": [{"logprobs": {"content": [{"top_logprobs": tops}]}}]}),
        ]
    )
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return next(replies)

    b = OtherServer(URL, model="m", transport=httpx.MockTransport(handler))
    caps = b.capabilities
    assert caps.evidence == {"judge"} and caps.concurrent and caps.identity == f"other:{URL}:m"
    s = await b.open_session(IMAGE, "q?")
    out = await b.generate_step(s, max_tokens=8, stop="\n")
    assert (out.text, out.eos, s.text) == ("Row 1", False, "Row 1\n")
    assert bodies[0]["continue_final_message"] is False and "skip_special_tokens" not in bodies[0]
    score = await b.score(s, "Row 2", stop="\n", judge=JudgeTemplate(suffix="Check:"))
    assert score.p_pos == pytest.approx(0.9048, abs=1e-4) and bodies[1]["continue_final_message"] is True
    with pytest.raises(ConfigError, match="use judge mode"):  # the OpenAI API has no prompt log-probs
        await b.score(s, "Row 3", stop="\n", judge=None)
    with pytest.raises(TypeError, match="abstract"):
        OpenAICompatBackend(URL)  # type: ignore[abstract]
