"""ServerSettings: where to listen, who may connect, and how much one client may ask for.

Validated at construction with a ``ConfigError`` (the core's exception root), like the core's
``ReasonerConfig``. Secure by default: loopback only; a non-loopback host needs a token unless
``allow_no_token`` says the operator knows what they are doing.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dreamr_stream.errors import ConfigError

__all__ = ["LOOPBACK_HOSTS", "ServerSettings", "is_loopback"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535, description="0 picks a free port")
    token: str | None = Field(default=None, min_length=8, repr=False, description="required at the handshake if set")
    allow_no_token: bool = Field(default=False, description="permit a non-loopback host without a token")
    origins: tuple[str, ...] = Field(
        default=(), description="extra allowed Origin values ('*' = any); the page's own origin is always allowed"
    )
    max_active: int = Field(default=4, ge=1, le=256, description="requests running in the engine at once")
    max_waiting: int = Field(default=64, ge=0, le=10_000, description="requests queued for a slot; more get 'busy'")
    max_connections: int = Field(default=256, ge=1, description="open WebSockets; more are refused with HTTP 503")
    max_connections_per_address: int = Field(
        default=16, ge=1, description="open WebSockets from one client address; more are refused with HTTP 503"
    )
    max_held_image_bytes: int = Field(
        default=256 * 2**20,
        ge=1,
        description="decoded images held by the requests running and waiting; a request over it gets 'busy'",
    )
    requests_per_minute: float | None = Field(
        default=120.0, gt=0.0, description="requests from one client address (in bursts up to as many); None = any"
    )
    idle_timeout_s: float | None = Field(
        default=60.0, gt=0.0, description="close a connection with no request for this long (pings do not count)"
    )
    parse_in_thread_bytes: int = Field(
        default=64 * 2**10, ge=0, description="client messages larger than this are parsed in a worker thread"
    )
    head_timeout_s: float = Field(
        default=10.0, gt=0.0, description="a connection whose first request head takes longer is dropped"
    )
    max_message_bytes: int = Field(default=8 * 2**20, ge=1024, description="largest client message (the upload)")
    send_timeout_s: float = Field(default=10.0, gt=0.0, description="a send that takes longer aborts the connection")
    ping_interval_s: float | None = Field(default=20.0, gt=0.0)
    serve_page: bool = True
    unix_path: str | None = Field(
        default=None,
        description="listen on this unix socket instead of host:port (made 0600: only its owner may connect); "
        "what the resident daemon behind `dreamr reason` uses",
    )

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            # without the input values: one of them may be the token
            detail = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
                for err in e.errors(include_input=False, include_url=False)
            )
            raise ConfigError(f"invalid server settings: {detail}") from None

    @field_validator("origins")
    @classmethod
    def _origins_look_like_origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for origin in v:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"origin {origin!r} must look like http://host[:port] or https://host[:port]")
        return tuple(o.rstrip("/") for o in v)

    @model_validator(mode="after")
    def _public_needs_token(self) -> ServerSettings:
        if not is_loopback(self.host) and self.token is None and not self.allow_no_token:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines: set a token (--token or DREAMR_TOKEN) "
                "or pass allow_no_token=True (--allow-no-token)"
            )
        return self

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)
