"""Outbound-webhook tables: endpoints, the event-type catalog, messages, their deliveries (one
per message and endpoint) and every attempt made for a delivery."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from relayport.core.crypto_rotation import register_encrypted_column
from relayport.core.db import Base, utcnow

DELIVERY_STATUSES = ("pending", "sending", "retrying", "succeeded", "dead")
FINISHED = ("succeeded", "dead")


class Endpoint(Base):
    """Where a tenant's messages go: URL(s), filters, secrets, limits and health state."""

    __tablename__ = "delivery_endpoints"
    __table_args__ = (Index("ix_delivery_endpoints_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(String(500), default="")
    # None: every (non-operational) event type; else exact names or "prefix.*" patterns.
    filter_types: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    channels: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    rate_limit_per_s: Mapped[float | None] = mapped_column(Float, default=None)
    fallback_urls: Mapped[list[str]] = mapped_column(JSON, default=list)
    routing: Mapped[str] = mapped_column(String(16), default="failover")
    fifo: Mapped[bool] = mapped_column(Boolean, default=False)
    retry_schedule_s: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(40), default=None)
    # One KeyRing token of the JSON list of {"value", "created_at", "expires_at"}, bound to
    # "<tenant_id>:<id>:secrets"; the dates are kept in clear so reads never decrypt.
    secrets_token: Mapped[str] = mapped_column(Text)
    secrets_meta: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    ed25519_public_key: Mapped[str | None] = mapped_column(String(100), default=None)
    # Circuit breaker shared by every worker: closed | open | half_open, and until when an
    # open (or probing) circuit holds deliveries back.
    circuit_state: Mapped[str] = mapped_column(String(16), default="closed")
    circuit_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Set by the first failure after a success; auto-disable measures from here.
    failing_since: Mapped[dt.datetime | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


register_encrypted_column(Endpoint.secrets_token)


class EventType(Base):
    """A named event type of a tenant's catalog, with an optional JSON Schema for payloads."""

    __tablename__ = "delivery_event_types"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_delivery_event_types_tenant_id_name"),
        Index("ix_delivery_event_types_tenant_id_id", "tenant_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(500), default="")
    schema: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Message(Base):
    """One event a tenant sent; its body is the exact bytes every delivery signs and sends."""

    __tablename__ = "delivery_messages"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id", "idempotency_key", name="uq_delivery_messages_tenant_id_idempotency_key"
        ),
        Index("ix_delivery_messages_tenant_id_id", "tenant_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    event_type: Mapped[str] = mapped_column(String(200))
    channels: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # NULLed once older than the idempotency window, so the key can be used again.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Delivery(Base):
    """A message on its way to one endpoint: pending → sending → succeeded | retrying → … → dead.

    `next_attempt_at` is the retry's time, the running attempt's lease end, or when it was
    queued: one index on (status, next_attempt_at) serves every scan of the scheduler.
    """

    __tablename__ = "delivery_deliveries"
    __table_args__ = (
        UniqueConstraint(
            "message_id", "endpoint_id", name="uq_delivery_deliveries_message_id_endpoint_id"
        ),
        Index("ix_delivery_deliveries_tenant_id_id", "tenant_id", "id"),
        Index("ix_delivery_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_delivery_deliveries_endpoint_id_id", "endpoint_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    message_id: Mapped[str] = mapped_column(String(40), ForeignKey("delivery_messages.id"))
    endpoint_id: Mapped[str] = mapped_column(String(40), ForeignKey("delivery_endpoints.id"))
    fifo: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime]
    locked_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Attempt(Base):
    """One HTTP attempt: also the endpoint's health series (latency and outcome over time)."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        Index("ix_delivery_attempts_tenant_id_id", "tenant_id", "id"),
        Index("ix_delivery_attempts_endpoint_id_id", "endpoint_id", "id"),
        Index("ix_delivery_attempts_message_id_id", "message_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    delivery_id: Mapped[str] = mapped_column(String(40))
    message_id: Mapped[str] = mapped_column(String(40))
    endpoint_id: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    succeeded: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error_class: Mapped[str | None] = mapped_column(String(16), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    latency_ms: Mapped[float] = mapped_column(Float)
    response_snippet: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TenantSettings(Base):
    """A tenant's own delivery defaults (today: its retry schedule), over the platform's."""

    __tablename__ = "delivery_tenant_settings"

    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), primary_key=True)
    retry_schedule_s: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
