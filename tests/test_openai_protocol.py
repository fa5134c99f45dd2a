"""The OpenAI translation, pure: requests parsed or refused with an error naming the field,
errors in OpenAI's shape, and engine events turned into chunks that the openai SDK's own types
accept (no server, no event loop)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from dreamr_websocket.openai_chunks import ChunkWriter, count_tokens, truncate_tokens
from dreamr_websocket.openai_protocol import (
    ChatRequest,
    OpenAIErrorResponse,
    api_error,
    error_for,
    model_list,
    parse_chat_request,
)
from dreamr_websocket.protocol import TAU_MAX, ServerMessageAdapter
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dreamr_stream.errors import BackendError, ConfigError, InvalidImageError, InvalidQuestionError
from dreamr_stream.events import (
    CacheHitEvent,
    DraftedEvent,
    Event,
    FailedEvent,
    FallbackEvent,
    FinishedEvent,
    RejectedEvent,
    StartedEvent,
    VerifiedEvent,
)
from dreamr_stream.types import ReasoningResult, ReasoningStats, Step, StepCost, StepSource, Verdict

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake bytes: decoding is the routes' job").decode()
IMAGE = f"data:image/png;base64,{PNG}"
QUESTION = "How many red shapes are there?"


def user(*parts: dict[str, Any] | str) -> dict[str, Any]:
    content: Any = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else list(parts)
    return {"role": "user", "content": content}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def image(url: str = IMAGE) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def body(*messages: dict[str, Any], **fields: Any) -> bytes:
    return json.dumps(
        {"model": "dreamr-demo", "messages": list(messages) or [user(text(QUESTION), image())], **fields}
    ).encode()


def parsed(data: bytes) -> ChatRequest:
    result = parse_chat_request(data)
    assert isinstance(result, ChatRequest), result
    return result


def refused(data: bytes, param: str | None = None, code: str | None = None) -> OpenAIErrorResponse:
    result = parse_chat_request(data)
    assert isinstance(result, OpenAIErrorResponse), result
    assert result.status == 400 and result.error.type == "invalid_request_error"
    assert param is None or result.error.param == param, result.error
    assert code is None or result.error.code == code, result.error
    return result


# ---------------------------------------------------------------- requests
def test_a_request_gives_the_image_the_question_and_the_options() -> None:
    request = parsed(
        body(
            {"role": "system", "content": "You are helpful."},
            {"role": "assistant", "content": [text("earlier")]},
            user(text("How many"), image(), text("red shapes?")),
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=50,
            max_completion_tokens=20,
            temperature=0,
            n=1,
            method="sequential",
            tau=2,
            verify="likelihood",
            lookahead=3,
            fallback="off",
            cache=False,
            drafts=True,
            max_steps=8,
            top_p=0.5,
            seed=7,
            user="someone",
            tools=[],
        )
    )
    assert request.image == PNG and request.question == "How many\nred shapes?"
    assert request.model == "dreamr-demo" and request.stream and request.include_usage
    assert request.max_tokens == 20  # max_completion_tokens wins
    o = request.options
    assert (o.method, o.tau, o.verify, o.lookahead, o.fallback, o.cache, o.drafts, o.max_steps) == (
        "sequential",
        2.0,
        "likelihood",
        3,
        "off",
        False,
        True,
        8,
    )


def test_defaults_a_string_question_and_no_dreamr_options() -> None:
    request = parsed(json.dumps({"messages": [user(image(), text(QUESTION))]}).encode())
    assert request.model is None and not request.stream and not request.include_usage and request.max_tokens is None
    assert request.question == QUESTION and request.options.method == "fpsr" and request.options.tau is None
    assert not request.options.drafts  # drafted events are opt-in here (OpenAI clients want verified steps)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"temperature": "0"}, "temperature"),
        ({"n": 1.5}, "n"),
        ({"model": 3}, "model"),
        ({"tau": "1"}, "tau"),
        ({"tau": -1}, "tau"),
        ({"tau": TAU_MAX * 10}, "tau"),
        ({"lookahead": 2.5}, "lookahead"),
        ({"cache": 1}, "cache"),
        ({"method": "magic"}, "method"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}, None),
        ({"messages": [{"role": "system", "content": [image()]}, user(image())]}, "messages.0.content.0.type"),
    ],
)
def test_a_wrong_type_or_value_is_400_naming_the_field(fields: dict[str, Any], param: str | None) -> None:
    error = refused(body(**fields), param or "messages.0.content.0.image_url.url")
    assert (param or "messages") in error.error.message
    assert PNG not in error.error.message  # input values are never echoed


def test_tau_infinity_from_python_json_is_refused() -> None:
    raw = body().replace(b'"model"', b'"tau": Infinity, "model"')
    assert "finite" in refused(raw, "tau").error.message


@pytest.mark.parametrize(
    "url",
    [
        "/etc/passwd",
        "file:///etc/passwd",
        "http://example.com/cat.png",
        "https://example.com/cat.png",
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png,rawbytes",
        "data:image/png;base64,",
        PNG,  # bare base64: a data URL is required here, as OpenAI's API has it
    ],
)
def test_an_image_that_is_not_a_data_url_is_refused(url: str) -> None:
    error = refused(body(user(text(QUESTION), image(url))), "messages.0.content.1.image_url.url", "invalid_image")
    assert "data URL" in error.error.message and "never fetches" in error.error.message


@pytest.mark.parametrize(
    ("messages", "found"),
    [
        ([user(QUESTION)], "no image"),
        ([user(text(QUESTION))], "no image"),
        ([user(image(), text(QUESTION), image())], "2 images"),
        ([user(image(), text("first")), {"role": "assistant", "content": "a"}, user(text("and now?"))], "no image"),
    ],
)
def test_exactly_one_image_in_the_last_user_message(messages: list[dict[str, Any]], found: str) -> None:
    error = refused(body(*messages), code="invalid_image")
    assert "exactly one image" in error.error.message and found in error.error.message


def test_the_last_message_must_be_the_users() -> None:
    error = refused(body(user(text(QUESTION), image()), {"role": "assistant", "content": "Answer:"}), "messages")
    assert "last message" in error.error.message


def test_only_greedy_decoding_and_one_choice() -> None:
    assert parsed(body(temperature=0.0)).options.method == "fpsr"
    error = refused(body(temperature=0.7), "temperature", "unsupported_value")
    assert "greedy" in error.error.message and "temperature must be 0" in error.error.message
    assert "n must be 1" in refused(body(n=2), "n", "unsupported_value").error.message


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"[1, 2]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"", "not JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(raw: bytes, says: str) -> None:
    assert says in refused(raw).error.message


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (400, "invalid_request_error", "invalid_request"),
        (401, "authentication_error", "invalid_api_key"),
        (404, "invalid_request_error", "model_not_found"),
        (413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_exceeded"),
        (500, "server_error", "internal_error"),
        (503, "server_error", "shutting_down"),
    ],
)
def test_errors_have_openais_shape_and_status(status: int, kind: str, code: str) -> None:
    from http import HTTPStatus

    error = api_error(HTTPStatus(status), "what went wrong", param="model")
    assert error.status == status
    assert error.body() == {"error": {"message": "what went wrong", "type": kind, "param": "model", "code": code}}
    assert error.headers() == {}


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    from http import HTTPStatus

    assert api_error(HTTPStatus.TOO_MANY_REQUESTS, "x", retry_after_s=0.2).headers() == {"Retry-After": "1"}
    assert api_error(HTTPStatus.TOO_MANY_REQUESTS, "x", retry_after_s=7.01).headers() == {"Retry-After": "8"}


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidImageError("not an image"), 400, "invalid_image"),
        (InvalidQuestionError("empty"), 400, "invalid_question"),
        (ConfigError("options.max_steps: at most 24"), 400, "invalid_option"),
        (BackendError("the server is down"), 500, "model_error"),
        (RuntimeError("boom"), 500, "model_error"),
    ],
)
def test_a_failure_maps_to_its_status(error: Exception, status: int, code: str) -> None:
    for made in (error_for(error), error_for(type(error).__name__, str(error))):
        assert (made.status, made.error.code) == (status, code) and str(error) in made.error.message


def test_model_list_validates_as_the_sdks_models() -> None:
    listing = model_list(["dreamr-demo", "other"], created=1_700_000_000)
    assert listing["object"] == "list" and [Model.model_validate(m).id for m in listing["data"]] == [
        "dreamr-demo",
        "other",
    ]


# ---------------------------------------------------------------- tokens
@pytest.mark.parametrize("s", ["", "Answer: 4", "read row one", "  a,b;c  d!  ", "1.5 + 2 = 3.5", "ünïcode wörds ok"])
def test_truncate_keeps_whole_tokens_up_to_the_limit(s: str) -> None:
    n = count_tokens(s)
    assert truncate_tokens(s, n) == s and truncate_tokens(s, n + 3) == s and truncate_tokens(s, 0) == ""
    for k in range(n + 1):
        cut = truncate_tokens(s, k)
        assert s.startswith(cut) and count_tokens(cut) == k


def test_count_tokens_counts_words_and_marks() -> None:
    assert count_tokens("Answer: 4") == 3 and count_tokens("read row one") == 3 and count_tokens("") == 0


# ---------------------------------------------------------------- chunks
def verdict(accepted: bool = True, ratio: float = 18.0) -> Verdict:
    return Verdict(p_pos=0.9, p_neg=0.05, ratio=ratio, tau=1.0, accepted=accepted)


STEPS = [
    Step(index=0, text="read row one", source=StepSource.DRAFT, verdict=verdict(ratio=float("inf"))),
    Step(
        index=1,
        text="read row two",
        source=StepSource.TARGET,
        rejected_draft="read row 2 wrongly",
        kept="read row",
        cost=StepCost(kept_tokens=2, written_tokens=1, target_forwards=1),
    ),
    Step(index=2, text="count them up", source=StepSource.CACHE, verdict=verdict()),
    Step(index=3, text="Answer: 4", source=StepSource.DRAFT, verdict=verdict(), is_final=True),
]


def run_events(steps: list[Step] = STEPS, answer: str | None = "4") -> list[Event]:
    """A request's events as the engine sends them: one rejection and repair, one cached step."""
    stats = ReasoningStats(draft_steps_judged=3, draft_steps_accepted=2, target_tokens=3, draft_tokens=12)
    result = ReasoningResult(question=QUESTION, steps=steps, answer=answer, stats=stats)
    events: list[Event] = [StartedEvent(question=QUESTION, method="fpsr"), CacheHitEvent(steps=1)]
    for step in steps:
        events.append(DraftedEvent(index=step.index, text=step.rejected_draft or step.text))
        if step.rejected_draft is not None:
            events.append(RejectedEvent(index=step.index, text=step.rejected_draft, verdict=verdict(False, 0.1)))
            events.append(FallbackEvent(step=step))
        else:
            events.append(VerifiedEvent(step=step))
    return [*events, FinishedEvent(result=result, elapsed_s=0.5)]


def write(events: list[Event], **options: Any) -> tuple[ChunkWriter, list[dict[str, Any]]]:
    writer = ChunkWriter(request_id="chatcmpl-1", model="dreamr-demo", created=1_700_000_000, **options)
    chunks: list[dict[str, Any]] = []
    for event in events:
        chunks += writer.feed(event)
        if writer.done:
            break
    for chunk in chunks:  # every chunk is JSON (no NaN or Infinity) that the SDK's type accepts
        json.loads(json.dumps(chunk, allow_nan=False))
        if "error" not in chunk:
            ChatCompletionChunk.model_validate(chunk)
    return writer, chunks


def deltas(chunks: list[dict[str, Any]], key: str) -> list[Any]:
    return [c["choices"][0]["delta"][key] for c in chunks if c.get("choices") and key in c["choices"][0]["delta"]]


def test_the_stream_is_role_then_steps_as_reasoning_then_the_answer_then_the_finish() -> None:
    writer, chunks = write(run_events())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    reasoning = deltas(chunks, "reasoning")
    assert reasoning == ["read row one", "\nread row two", "\ncount them up", "\nAnswer: 4"]
    assert deltas(chunks, "reasoning_content") == reasoning
    assert "".join(reasoning) == "\n".join(s.text for s in STEPS)
    assert deltas(chunks, "content") == ["", "4"]  # the role chunk's empty content, then the answer
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"]["dreamr"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks) == 1 + len(STEPS) + 2 and writer.done and writer.finish_reason == "stop"


def test_each_step_carries_the_websocket_message_of_its_event() -> None:
    _, chunks = write(run_events())
    dreamr = [d for d in deltas(chunks, "dreamr") if d["type"] in ("verified", "fallback")]
    assert [d["type"] for d in dreamr] == ["verified", "fallback", "verified", "verified"]
    for message, step in zip(dreamr, STEPS, strict=True):
        ServerMessageAdapter.validate_python(message)  # the protocol's own message
        assert message["id"] == "chatcmpl-1" and message["step"]["source"] == step.source.value
    assert dreamr[0]["step"]["verdict"]["ratio"] == "inf"
    assert dreamr[1]["step"]["kept"] == "read row" and dreamr[1]["step"]["rejected_draft"] == "read row 2 wrongly"
    stats = deltas(chunks, "dreamr")[-1]
    assert stats["type"] == "stats" and stats["acceptance_rate"] == pytest.approx(2 / 3)


def test_drafts_rejections_and_cache_hits_only_when_asked() -> None:
    _, quiet = write(run_events())
    _, chatty = write(run_events(), drafts=True)
    kinds = [d["type"] for d in deltas(chatty, "dreamr")]
    assert kinds.count("drafted") == 4 and kinds.count("rejected") == 1 and kinds.count("cache_hit") == 1
    assert not {"drafted", "rejected", "cache_hit"} & {d["type"] for d in deltas(quiet, "dreamr")}
    assert deltas(chatty, "reasoning") == deltas(quiet, "reasoning")


def test_usage_counts_reasoning_and_answer_and_comes_last_when_asked() -> None:
    _, chunks = write(run_events(), include_usage=True, prompt_tokens=count_tokens(QUESTION))
    usage = chunks[-1]
    assert usage["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    reasoning = sum(count_tokens(s.text) for s in STEPS)
    assert usage["usage"] == {
        "prompt_tokens": 7,  # six words and a question mark
        "completion_tokens": reasoning + 1,
        "total_tokens": 7 + reasoning + 1,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    _, without = write(run_events())
    assert all("usage" not in c for c in without)


def test_the_completion_says_what_the_stream_says() -> None:
    writer, chunks = write(run_events(), prompt_tokens=6)
    completion = ChatCompletion.model_validate(writer.completion())
    message = completion.choices[0].message
    assert message.content == "4" and completion.choices[0].finish_reason == "stop"
    extra = message.model_extra or {}
    assert extra["reasoning"] == extra["reasoning_content"] == "".join(deltas(chunks, "reasoning"))
    assert [s["text"] for s in extra["dreamr"]["steps"]] == [s.text for s in STEPS]
    assert extra["dreamr"]["stats"]["type"] == "stats"
    assert completion.usage is not None and completion.usage.completion_tokens == writer.completion_tokens


@pytest.mark.parametrize("limit", range(1, 14))
def test_max_tokens_cuts_at_the_limit_and_says_length(limit: int) -> None:
    total = sum(count_tokens(s.text) for s in STEPS) + 1  # 12 reasoning + the answer's 1
    writer, chunks = write(run_events(), max_tokens=limit, include_usage=True)
    assert writer.done
    if limit < total:
        assert writer.finish_reason == "length" and writer.completion_tokens == limit
        assert not any(isinstance(e, FinishedEvent) for e in run_events()[: len(chunks)])  # stopped early
    else:
        assert writer.finish_reason == "stop" and writer.completion_tokens == total
    assert chunks[-1]["usage"]["completion_tokens"] == writer.completion_tokens <= limit
    reasoning = "".join(deltas(chunks, "reasoning"))
    assert "\n".join(s.text for s in STEPS).startswith(reasoning)
    ChatCompletion.model_validate(writer.completion())


def test_a_failure_is_an_error_object_and_ends_the_stream() -> None:
    events = [*run_events()[:5], FailedEvent(error="BackendError", message="the server is down")]
    writer, chunks = write(events)
    assert writer.done and writer.error is not None and writer.error.status == 500
    assert chunks[-1] == writer.error.body() and len(deltas(chunks, "reasoning")) == 1
    assert chunks[-1]["error"]["type"] == "server_error" and chunks[-1]["error"]["code"] == "model_error"
    assert writer.feed(run_events()[-1]) == []  # nothing after the end


def test_no_answer_when_the_steps_ran_out_and_a_final_step_without_the_prefix() -> None:
    writer, chunks = write(run_events(STEPS[:3], answer=None))
    assert writer.finish_reason == "length" and writer.content is None and deltas(chunks, "content") == [""]
    eos_final = [*STEPS[:3], Step(index=3, text="four", source=StepSource.TARGET, is_final=True)]
    writer, chunks = write(run_events(eos_final, answer=None))
    assert writer.finish_reason == "stop" and deltas(chunks, "content")[-1] == "four"


def test_a_queued_notice_rides_on_the_first_chunk_once() -> None:
    writer = ChunkWriter(request_id="chatcmpl-1", model="m", created=0)
    first = writer.start(dreamr={"type": "queued", "position": 2})
    assert first[0]["choices"][0]["delta"]["dreamr"]["position"] == 2
    assert writer.start() == [] and writer.feed(StartedEvent(question=QUESTION, method="fpsr")) == []
