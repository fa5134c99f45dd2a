"""A served target without verification settings is never run silently on default TBVM: the
Reasoner warns once (our own warning category, at the caller's line, and in the log), naming the
fix; never with settings, with a chosen tau, or for a target computing in this process.

Against a fake OpenAI-compatible server (``httpx.MockTransport``, as in test_vllm_client.py): no
real vLLM, and a served draft that nothing ever connects to where no request runs."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from dreamr_vllm import VLLMBackend
from PIL import Image

from dreamr_stream import Reasoner, UncalibratedVerificationWarning
from dreamr_stream.backends.base import Capabilities
from dreamr_stream.backends.fake import AsyncScriptedBackend, ScriptedBackend
from dreamr_stream.backends.shipped import demo_paths
from dreamr_stream.config import CacheConfig, ReasonerConfig, VerificationConfig
from dreamr_stream.uncalibrated import uncalibrated

URL = "http://127.0.0.1:9/v1"  # nothing listens there: only the fake transport answers
IMAGE = Image.new("RGB", (16, 16), (1, 2, 3))
ANSWER = "Answer: 4"
NO_CACHE = ReasonerConfig(cache=CacheConfig(enabled=False))


def fake_server(request: httpx.Request) -> httpx.Response:
    """A one-step answer when streamed, a confident ``yes`` verdict otherwise."""
    body = json.loads(request.content)
    if body.get("stream"):
        choice = {"index": 0, "delta": {"content": ANSWER}, "finish_reason": "stop", "stop_reason": None}
        return httpx.Response(200, text=f"data: {json.dumps({'choices': [choice]})}\n\ndata: [DONE]\n\n")
    verdict = {"logprobs": {"content": [{"top_logprobs": [{"token": " yes", "logprob": -0.01}]}]}}
    return httpx.Response(200, json={"choices": [verdict]})


def served_target(**kwargs: Any) -> VLLMBackend:
    return VLLMBackend.connect(URL, model="t", name="target", transport=httpx.MockTransport(fake_server), **kwargs)


@contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning of ours, each time it is issued (``always``: a second one would show)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out: list[warnings.WarningMessage] = []
        yield out
        out += [w for w in caught if issubclass(w.category, UncalibratedVerificationWarning)]


def test_a_served_target_without_settings_warns_once_however_many_requests_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="dreamr_stream"), recorded() as caught:
        reasoner = Reasoner(served_target(), AsyncScriptedBackend([ANSWER], name="draft"), config=NO_CACHE)
        try:
            for _ in range(3):
                assert reasoner.invoke(IMAGE, "q?").answer == "4"  # it still runs, as asked
        finally:
            reasoner.close()
    assert len(caught) == 1 and reasoner.uncalibrated
    message = str(caught[0].message)
    assert "settings_from=" in message and "dreamr calibrate --target-url" in message and URL in message
    assert caught[0].filename == __file__  # the caller's line, not the library's
    logged = [r for r in caplog.records if "no verification settings" in r.getMessage()]
    assert len(logged) == 1


def test_from_pretrained_on_a_url_warns_at_the_caller_s_line_and_not_with_settings_from() -> None:
    with recorded() as caught:
        bare = Reasoner.from_pretrained(target=URL, draft="http://127.0.0.1:9/draft/v1")  # nothing connects yet
    bare.close()
    assert len(caught) == 1 and caught[0].filename == __file__
    with recorded() as caught:
        calibrated = Reasoner.from_pretrained(
            target=URL, draft="http://127.0.0.1:9/draft/v1", settings_from=demo_paths().target
        )
    calibrated.close()
    assert caught == [] and not calibrated.uncalibrated


@pytest.mark.parametrize(
    "build",
    [
        # the target folder's dreamr.json, as settings_from gives it
        lambda: Reasoner(served_target(settings_from=demo_paths().target), AsyncScriptedBackend([ANSWER])),
        # a tau the caller chose is a decision, not a default
        lambda: Reasoner(
            served_target(),
            AsyncScriptedBackend([ANSWER]),
            config=ReasonerConfig(verification=VerificationConfig(tau=2)),
        ),
        # nothing to verify: the target alone
        lambda: Reasoner(served_target()),
        # a target computing in this process
        lambda: Reasoner(ScriptedBackend([ANSWER], name="target"), ScriptedBackend([ANSWER], name="draft")),
    ],
    ids=["settings_from", "chosen-tau", "no-draft", "in-process"],
)
def test_no_warning_where_verification_is_calibrated_chosen_or_not_served(build: Callable[[], Reasoner]) -> None:
    with recorded() as caught:
        reasoner = build()
    reasoner.close()
    assert caught == [] and not reasoner.uncalibrated


@pytest.mark.slow
def test_a_local_target_folder_never_warns() -> None:
    with recorded() as caught:
        reasoner = Reasoner.from_pretrained(target=demo_paths().target, draft="http://127.0.0.1:9/draft/v1")
    reasoner.close()
    assert caught == [] and not reasoner.uncalibrated


def test_the_draft_s_settings_are_never_taken_for_the_target_s() -> None:
    """Only the target's capabilities count: a draft trained for the task does not calibrate it."""
    served = Capabilities(identity="vllm:x", device="remote", task=None)
    assert uncalibrated(served, ReasonerConfig(), has_draft=True)
    recommended = Capabilities(identity="vllm:x", device="remote", recommended_verification={"tau": 1.0})
    assert not uncalibrated(recommended, ReasonerConfig(), has_draft=True)
