"""Wire shapes of the inbound-webhook API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from relayport.core.schemas import Name, Strict

Scheme = Literal["github", "stripe", "standard", "shopify", "slack", "hmac"]
JobStatus = Literal["queued", "running", "succeeded", "retrying", "dead"]

MAX_SECRETS = 3
DEFAULT_BODY_LIMIT = 1_048_576
MAX_BODY_LIMIT = 10 * 1_048_576
MAX_TOLERANCE_S = 86_400
MAX_GRACE_S = 30 * 86_400

HeaderName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")]
Secret = Annotated[str, Field(min_length=1, max_length=500)]
# RFC 6901: "" (the whole document) or "/"-separated tokens with "~0" and "~1" escapes.
JsonPointer = Annotated[str, Field(max_length=200, pattern=r"^(/([^~/]|~[01])*)*$")]
HandlerName = Annotated[str, Field(min_length=1, max_length=100)]


class HmacConfigIn(Strict):
    header: HeaderName = Field(description="The header carrying the signature.")
    algorithm: Literal["sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = Field(default="", max_length=40, description='e.g. "sha256=".')
    timestamp_header: HeaderName | None = Field(
        default=None, description='When set, the MAC covers "<timestamp>.<body>".'
    )


class HmacConfigOut(BaseModel):
    header: str
    algorithm: str
    encoding: str
    prefix: str
    timestamp_header: str | None


class SourceCreate(Strict):
    name: Name
    scheme: Scheme
    secrets: list[Secret] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SECRETS,
        description="Signing secrets as the provider shows them; one is generated when omitted.",
    )
    tolerance_s: int = Field(default=300, ge=1, le=MAX_TOLERANCE_S)
    body_limit_bytes: int = Field(default=DEFAULT_BODY_LIMIT, ge=1, le=MAX_BODY_LIMIT)
    hmac: HmacConfigIn | None = Field(default=None, description="Required for scheme `hmac`.")
    type_pointer: JsonPointer | None = Field(
        default=None, description="JSON pointer to the event type in the body (scheme `hmac`)."
    )
    handler: HandlerName = "noop"
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    enabled: bool = True

    @model_validator(mode="after")
    def _hmac_matches_scheme(self) -> SourceCreate:
        if (self.scheme == "hmac") != (self.hmac is not None):
            raise ValueError("`hmac` is required for scheme hmac and only allowed there")
        return self


class SourceUpdate(Strict):
    """Fields to change; the scheme is fixed (new secrets would be needed anyway)."""

    name: Name | None = None
    tolerance_s: int | None = Field(default=None, ge=1, le=MAX_TOLERANCE_S)
    body_limit_bytes: int | None = Field(default=None, ge=1, le=MAX_BODY_LIMIT)
    hmac: HmacConfigIn | None = None
    type_pointer: JsonPointer | None = None
    handler: HandlerName | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    enabled: bool | None = None


class SecretRotate(Strict):
    secret: Secret | None = Field(default=None, description="Generated when omitted.")
    grace_period_s: int = Field(
        default=86_400,
        ge=0,
        le=MAX_GRACE_S,
        description="How long the current secrets keep verifying.",
    )


class SecretInfo(BaseModel):
    created_at: dt.datetime
    expires_at: dt.datetime | None


class SecretRevealed(SecretInfo):
    value: str


class _SourceFields(BaseModel):
    id: str
    name: str
    scheme: Scheme
    ingest_url: str = Field(description="Give this path (on your public host) to the provider.")
    tolerance_s: int
    body_limit_bytes: int
    hmac: HmacConfigOut | None
    type_pointer: str | None
    handler: str
    max_attempts: int
    enabled: bool
    created_at: dt.datetime
    updated_at: dt.datetime


class SourceOut(_SourceFields):
    secrets: list[SecretInfo] = Field(description="Active secrets, newest first; never values.")


class SourceCreated(_SourceFields):
    secrets: list[SecretRevealed] = Field(description="Shown in this response only.")


class SourceRotated(SourceOut):
    secret: str = Field(description="The new secret, shown in this response only.")


class IngestResult(BaseModel):
    status: Literal["accepted", "duplicate"]
    event_id: str


class EventOut(BaseModel):
    id: str
    source_id: str
    type: str
    subject: str | None
    dedup_key: str
    sha256: str
    size: int
    headers: dict[str, str]
    received_at: dt.datetime
    duplicate_count: int


class EventDetail(EventOut):
    cloudevent: dict[str, Any] = Field(description="The CloudEvents 1.0 envelope handlers get.")
    body: Any = Field(description="The body as JSON, or as text when it is not JSON.")


class JobOut(BaseModel):
    id: str
    event_id: str
    source_id: str
    status: JobStatus
    attempts: int
    max_attempts: int
    next_attempt_at: dt.datetime
    locked_until: dt.datetime | None
    last_error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None


class ReplayResult(BaseModel):
    replayed: int = Field(description="Jobs sent round again.")


class RejectionOut(BaseModel):
    id: str
    source_id: str
    reason: str
    received_at: dt.datetime
    headers: dict[str, str]
    body_prefix: str = Field(description="The first 1 KiB of the body, as text.")
    body_size: int
