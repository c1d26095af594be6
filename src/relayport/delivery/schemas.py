"""Wire shapes of the outbound-webhook API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from relayport.core.schemas import Strict
from relayport.delivery import filters

Routing = Literal["failover", "round_robin", "adaptive"]
DeliveryStatus = Literal["pending", "sending", "retrying", "succeeded", "dead"]

MAX_FALLBACKS = 5
MAX_GRACE_S = 30 * 86_400
MAX_PAYLOAD_BYTES = 512 * 1024
# Headers the platform sets itself: a custom header must not forge or break them.
RESERVED_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        "connection",
        "user-agent",
        "te",
        "upgrade",
        "proxy-authorization",
    }
)


def _filter(value: str) -> str:
    if not filters.TYPE_FILTER.match(value):
        raise ValueError('an event type, "prefix.*" or "*"')
    return value


def _type_name(value: str) -> str:
    if not filters.TYPE_NAME.match(value):
        raise ValueError("dotted words of letters, digits, _ and -")
    return value


def _channel(value: str) -> str:
    if not filters.CHANNEL.match(value):
        raise ValueError("1-128 of letters, digits, _ . : -")
    return value


def _headers(value: dict[str, str]) -> dict[str, str]:
    for name, content in value.items():
        if not name or len(name) > 100 or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"bad header name {name[:100]!r}")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"{name!r} is set by the platform")
        # Printable ASCII only: HTTP/1.1 field values outside it are refused by peers (and
        # by aiohttp at send time), and CR/LF would split the header.
        if len(content) > 1000 or not all(0x20 <= ord(c) < 0x7F for c in content):
            raise ValueError(f"bad value for header {name!r}")
    return {k.lower(): v for k, v in value.items()}


Url = Annotated[str, Field(min_length=1, max_length=2000)]
TypeFilter = Annotated[str, Field(max_length=200), AfterValidator(_filter)]
TypeName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_type_name)]
Channel = Annotated[str, AfterValidator(_channel)]
Headers = Annotated[dict[str, str], Field(max_length=20), AfterValidator(_headers)]
Secret = Annotated[str, Field(min_length=1, max_length=200)]
Schedule = Annotated[
    list[Annotated[float, Field(ge=0, le=7 * 86_400)]], Field(min_length=1, max_length=50)
]


class EndpointCreate(Strict):
    url: Url
    description: str = Field(default="", max_length=500)
    filter_types: list[TypeFilter] | None = Field(
        default=None, max_length=100, description="Null: every event type."
    )
    channels: list[Channel] | None = Field(default=None, max_length=20)
    headers: Headers = Field(default_factory=dict)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=100_000)
    enabled: bool = True
    fallback_urls: list[Url] = Field(default_factory=list, max_length=MAX_FALLBACKS)
    routing: Routing = "failover"
    fifo: bool = False
    retry_schedule_s: Schedule | None = None
    secret: Secret | None = Field(default=None, description="whsec_…; generated when omitted.")
    ed25519: bool = Field(default=False, description="Also sign with Ed25519 (v1a).")


class EndpointUpdate(Strict):
    url: Url | None = None
    description: str | None = Field(default=None, max_length=500)
    filter_types: list[TypeFilter] | None = Field(default=None, max_length=100)
    channels: list[Channel] | None = Field(default=None, max_length=20)
    headers: Headers | None = None
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=100_000)
    enabled: bool | None = None
    fallback_urls: list[Url] | None = Field(default=None, max_length=MAX_FALLBACKS)
    routing: Routing | None = None
    fifo: bool | None = None
    retry_schedule_s: Schedule | None = None


class SecretInfo(BaseModel):
    created_at: dt.datetime
    expires_at: dt.datetime | None


class EndpointOut(BaseModel):
    id: str
    url: str
    description: str
    filter_types: list[str] | None
    channels: list[str] | None
    headers: dict[str, str]
    rate_limit_per_s: float | None
    enabled: bool
    disabled_reason: str | None
    fallback_urls: list[str]
    routing: str
    fifo: bool
    retry_schedule_s: list[float] | None
    circuit_state: str
    ed25519_public_key: str | None
    secrets: list[SecretInfo]
    created_at: dt.datetime
    updated_at: dt.datetime


class EndpointCreated(EndpointOut):
    secret: str = Field(description="The signing secret; also at GET …/secret (operators).")


class EndpointSecret(BaseModel):
    key: str = Field(description="The newest secret: the one to verify with.")
    secrets: list[str] = Field(description="Every active secret, newest first.")
    ed25519_public_key: str | None


class SecretRotate(Strict):
    key: Secret | None = Field(default=None, description="whsec_…; generated when omitted.")
    grace_period_s: int | None = Field(default=None, ge=0, le=MAX_GRACE_S)


class EventTypeCreate(Strict):
    name: TypeName
    description: str = Field(default="", max_length=500)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class EventTypeUpdate(Strict):
    description: str | None = Field(default=None, max_length=500)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class EventTypeOut(BaseModel):
    id: str
    name: str
    description: str
    schema_: dict[str, Any] | None = Field(alias="schema", serialization_alias="schema")
    created_at: dt.datetime
    updated_at: dt.datetime

    model_config = {"populate_by_name": True}


class MessageCreate(Strict):
    event_type: TypeName
    payload: dict[str, Any]
    channels: list[Channel] | None = Field(default=None, max_length=10)
    event_id: str | None = Field(
        default=None, min_length=1, max_length=200, description="Idempotency key, if no header."
    )


class DeliveryOut(BaseModel):
    id: str
    endpoint_id: str
    status: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_error: str | None
    finished_at: dt.datetime | None


class MessageOut(BaseModel):
    id: str
    event_type: str
    channels: list[str] | None
    event_id: str | None
    payload: Any
    created_at: dt.datetime
    deliveries: list[DeliveryOut] | None = None


class AttemptOut(BaseModel):
    id: str
    delivery_id: str
    message_id: str
    endpoint_id: str
    attempt: int
    url: str
    succeeded: bool
    status_code: int | None
    error_class: str | None
    error: str | None
    latency_ms: float
    response_snippet: str | None
    created_at: dt.datetime


class Requeued(BaseModel):
    deliveries: int


class RetryBody(Strict):
    endpoint_id: str | None = Field(default=None, max_length=64)


class EndpointHealth(BaseModel):
    """A summary of an endpoint's recent attempts (the newest `window` of them, since `since`)."""

    endpoint_id: str
    circuit_state: str
    enabled: bool
    failing_since: dt.datetime | None
    attempts: int
    succeeded: int
    success_rate: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    errors: dict[str, int] = Field(description="Failed attempts by error class.")


class DeliverySettingsIn(Strict):
    retry_schedule_s: Schedule | None = Field(
        description="Delay before each attempt for this tenant's endpoints without their own; "
        "null: the platform's."
    )


class DeliverySettingsOut(BaseModel):
    retry_schedule_s: list[float] | None
    effective_retry_schedule_s: list[float]
