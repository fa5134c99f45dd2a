"""WebSocket protocol, settings and handshake gates as pure functions (no server, no event loop)."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
from dreamr_websocket import routes
from dreamr_websocket.protocol import (
    SCHEMA_PATH,
    TAU_MAX,
    AskMessage,
    ErrorMessage,
    RequestOptions,
    ServerMessageAdapter,
    from_event,
    parse_client_message,
    protocol_schema,
)
from dreamr_websocket.session import decode_image, request_config
from dreamr_websocket.settings import ServerSettings
from starlette.requests import HTTPConnection
from ws_support import png_b64

from dreamr_app.cli import build_parser
from dreamr_stream.config import GenerationConfig, InputLimits, ReasonerConfig
from dreamr_stream.errors import ConfigError, InvalidImageError
from dreamr_stream.events import FailedEvent, FinishedEvent, RejectedEvent
from dreamr_stream.types import ReasoningResult, ReasoningStats, Step, StepSource, Verdict


def test_committed_schema_matches_the_models() -> None:
    committed = json.loads(SCHEMA_PATH.read_text())
    assert committed == json.loads(json.dumps(protocol_schema())), (
        "the protocol changed: run `python -m dreamr_websocket.protocol` and commit the schema"
    )
    assert committed["close_codes"]["message_too_big"] == 1009
    assert set(committed["server"]["discriminator"]["mapping"]) >= {"verified", "rejected", "fallback", "error"}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json {", "bad_json"),
        ("[1, 2]", "bad_request"),
        ('{"v": 2, "type": "ask"}', "unsupported_version"),
        ('{"type": "ask"}', "unsupported_version"),
        ('{"v": 1, "type": "launch"}', "bad_request"),
        ('{"v": 1, "type": "ask", "question": "q"}', "bad_request"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "extra": 1}', "bad_request"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"temperature": 2}}', "invalid_option"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"tau": -1}}', "invalid_option"),
        # Python's JSON reads these as floats (1e999 as inf): a client's tau is finite and at most TAU_MAX
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"tau": Infinity}}', "invalid_option"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"tau": -Infinity}}', "invalid_option"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"tau": NaN}}', "invalid_option"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"tau": "inf"}}', "invalid_option"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"tau": 1e999}}', "invalid_option"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"tau": 1e300}}', "invalid_option"),
        ('{"v": 1, "type": "ask", "image": "x", "question": "q", "options": {"method": "magic"}}', "invalid_option"),
    ],
)
def test_bad_client_messages_become_error_messages(raw: str, code: str) -> None:
    message = parse_client_message(raw)
    assert isinstance(message, ErrorMessage) and message.code == code, message
    assert '"x"' not in message.message  # input values are never echoed back


def test_a_finite_tau_up_to_the_maximum_is_taken() -> None:
    for tau in (0, 0.25, 1e6):
        raw = json.dumps({"v": 1, "type": "ask", "image": "aGk=", "question": "q", "options": {"tau": tau}})
        message = parse_client_message(raw)
        assert isinstance(message, AskMessage) and message.options.tau == tau
    with pytest.raises(ValueError, match="finite"):
        RequestOptions(tau=math.inf)


def test_valid_ask_and_id_echo() -> None:
    message = parse_client_message(json.dumps({"v": 1, "type": "ask", "id": "q-1", "image": "aGk=", "question": "q"}))
    assert isinstance(message, AskMessage) and message.id == "q-1" and message.options == RequestOptions()
    error = parse_client_message(json.dumps({"v": 1, "type": "ask", "id": "q-2", "question": "q"}))
    assert isinstance(error, ErrorMessage) and error.id == "q-2"
    hostile = parse_client_message(json.dumps({"v": 1, "type": "ask", "id": "<script>", "question": "q"}))
    assert isinstance(hostile, ErrorMessage) and hostile.id is None


def test_engine_events_map_to_wire_messages() -> None:
    verdict = Verdict(p_pos=1.0, p_neg=0.0, ratio=math.inf, tau=1.0, accepted=True)
    step = Step(index=0, text="Answer: 3", source=StepSource.DRAFT, verdict=verdict, is_final=True)
    result = ReasoningResult(question="q", steps=[step], answer="3", stats=ReasoningStats(draft_steps_judged=1))
    answer, stats = from_event(FinishedEvent(result=result, elapsed_s=0.5), "r1")
    assert answer.type == "answer" and answer.answer == "3" and stats.type == "stats" and stats.stats.timeline == []
    wire = answer.model_dump_json()
    assert '"ratio":"inf"' in wire  # JSON has no infinity; it round-trips as a string
    assert ServerMessageAdapter.validate_json(wire) == answer
    [error] = from_event(FailedEvent(error="BackendError", message="boom"), "r1")
    assert error.type == "error" and error.code == "model_error" and error.id == "r1"
    [rejected] = from_event(
        RejectedEvent(index=1, text="t", verdict=verdict.model_copy(update={"accepted": False})), "r"
    )
    assert rejected.type == "rejected"


def test_decode_image_takes_base64_only_never_a_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    limits = InputLimits()
    image = decode_image(png_b64(16), limits)
    assert image.size == (16, 16)
    assert decode_image("data:image/png;base64," + png_b64(16), limits).size == (16, 16)
    path = tmp_path / "secret.png"
    path.write_bytes(base64.b64decode(png_b64(16)))
    with pytest.raises(InvalidImageError, match="base64"):
        decode_image(str(path), limits)  # the core's load_image would open it; the server must not
    with pytest.raises(InvalidImageError):
        decode_image(base64.b64encode(b"definitely not a png").decode(), limits)
    with pytest.raises(InvalidImageError, match="over the limit"):
        decode_image("A" * 4096, InputLimits(max_image_bytes=1000))


def test_request_config_applies_options_within_server_limits() -> None:
    base = ReasonerConfig(generation=GenerationConfig(max_steps=10))
    cfg = request_config(base, RequestOptions(tau=TAU_MAX, max_steps=5, lookahead=3, cache=False))
    assert cfg.verification.tau == TAU_MAX and cfg.generation.max_steps == 5 and cfg.scheduling.lookahead == 3
    assert not cfg.cache.enabled and cfg.limits == base.limits
    assert request_config(base, RequestOptions()) == base
    with pytest.raises(ConfigError, match="at most 10"):
        request_config(base, RequestOptions(max_steps=11))
    with pytest.raises(ConfigError, match="lookahead"):
        request_config(base, RequestOptions(max_steps=2, lookahead=3))
    # fewer steps than the server's lookahead, with no lookahead asked for: the lookahead comes down with them
    assert request_config(base, RequestOptions(max_steps=1)).scheduling.lookahead == 1


def test_settings_are_secure_by_default() -> None:
    s = ServerSettings()
    assert s.host == "127.0.0.1" and s.loopback and s.token is None
    with pytest.raises(ConfigError, match="token"):
        ServerSettings(host="0.0.0.0")
    assert ServerSettings(host="0.0.0.0", token="long-enough-token").token
    assert ServerSettings(host="0.0.0.0", allow_no_token=True)
    with pytest.raises(ConfigError, match="origin"):
        ServerSettings(origins=("evil.example",))
    assert "long-enough" not in repr(ServerSettings(token="long-enough-token"))
    with pytest.raises(ConfigError, match="token: String should have at least 8") as info:
        ServerSettings(token="short")
    assert "short" not in str(info.value).replace("String should", "")  # the value itself is never shown


def test_cli_defaults_match_server_settings() -> None:
    args = build_parser().parse_args(["serve"])
    s = ServerSettings()
    assert (args.host, args.port, args.max_active, args.max_waiting) == (s.host, s.port, s.max_active, s.max_waiting)
    assert (args.max_connections, args.max_message_bytes, args.send_timeout) == (
        s.max_connections,
        s.max_message_bytes,
        s.send_timeout_s,
    )
    assert args.head_timeout == s.head_timeout_s


def test_cli_token_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from dreamr_app.serve import settings_from_args

    monkeypatch.setenv("DREAMR_TOKEN", "from-the-environment")
    assert settings_from_args(build_parser().parse_args(["serve"])).token == "from-the-environment"
    args = build_parser().parse_args(["serve", "--token", "from-the-command-line", "--origin", "https://a.example"])
    settings = settings_from_args(args)
    assert settings.token == "from-the-command-line" and settings.origins == ("https://a.example",)
    monkeypatch.delenv("DREAMR_TOKEN")
    with pytest.raises(ConfigError, match="token"):
        settings_from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))


def _request(target: str = "/ws", **headers: str) -> HTTPConnection:
    path, _, query = target.partition("?")
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return HTTPConnection({"type": "http", "path": path, "query_string": query.encode(), "headers": raw})


def test_token_gate() -> None:
    assert routes.token_ok(_request(), None)
    assert not routes.token_ok(_request(), "s3cret-token")
    assert routes.token_ok(_request(Authorization="Bearer s3cret-token"), "s3cret-token")
    assert routes.token_ok(_request("/ws?token=s3cret-token"), "s3cret-token", allow_query=True)
    assert not routes.token_ok(_request("/ws?token=wrong"), "s3cret-token", allow_query=True)
    # in the URL only where a browser has no other way: the page's WebSocket
    assert not routes.token_ok(_request("/stats?token=s3cret-token"), "s3cret-token")


def test_origin_and_host_gates() -> None:
    s = ServerSettings()
    same = {"Host": "127.0.0.1:8765", "Origin": "http://127.0.0.1:8765"}
    assert routes.origin_allowed(_request(**same), s)
    assert routes.origin_allowed(_request(Host="localhost:8765"), s)  # no Origin: not a browser page
    assert not routes.origin_allowed(_request(Host="127.0.0.1:8765", Origin="https://evil.example"), s)
    assert not routes.origin_allowed(_request(Host="127.0.0.1:8765", Origin="null"), s)
    allow = ServerSettings(origins=("https://app.example",))
    assert routes.origin_allowed(_request(Host="127.0.0.1:8765", Origin="https://app.example"), allow)
    # DNS rebinding: a hostile name that resolves to 127.0.0.1 is same-origin with itself
    rebound = {"Host": "evil.example:8765", "Origin": "http://evil.example:8765"}
    assert not routes.host_allowed(_request(**rebound), s)
    assert not routes.origin_allowed(_request(**rebound), s)
    assert routes.host_allowed(_request(Host="[::1]:8765"), s)


def test_the_page_handles_every_server_message_type() -> None:
    """A new core event reaches the wire by itself (``EVENT_MESSAGES``); the page must say what
    it does with it, so a message type it does not name fails here."""
    from pathlib import Path
    from typing import get_args

    import dreamr_websocket
    from dreamr_websocket.protocol import ServerMessage

    members = get_args(get_args(ServerMessage)[0])
    wire_types = {m.model_fields["type"].default for m in members}
    assert {"drafted", "verified", "rejected", "fallback", "cache_hit", "started"} <= wire_types
    script = (Path(dreamr_websocket.__file__).parent / "static" / "app.js").read_text()
    handled = set(re.findall(r'case "(\w+)"', script)) | set(re.findall(r'msg\.type === "(\w+)"', script))
    assert wire_types <= handled, f"app.js does not handle {sorted(wire_types - handled)}"
