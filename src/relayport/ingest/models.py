"""Inbound-webhook tables: sources, the inbox of received events, their jobs, and rejections."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
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

JOB_STATUSES = ("queued", "running", "succeeded", "retrying", "dead")


class Source(Base):
    """Where a provider sends webhooks: its scheme, secrets and limits, and where events go."""

    __tablename__ = "ingest_sources"
    __table_args__ = (Index("ix_ingest_sources_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    scheme: Mapped[str] = mapped_column(String(16))
    # One KeyRing token of a JSON list of {"value", "created_at", "expires_at"}, sealed with
    # aad "<tenant_id>:<id>:secrets" so a token copied to another source does not open.
    secrets_token: Mapped[str] = mapped_column(Text)
    # The same list without the values, so reads never need to decrypt.
    secrets_meta: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    tolerance_s: Mapped[int] = mapped_column(Integer, default=300)
    body_limit_bytes: Mapped[int] = mapped_column(Integer, default=1_048_576)
    hmac_header: Mapped[str | None] = mapped_column(String(100), default=None)
    hmac_algorithm: Mapped[str | None] = mapped_column(String(16), default=None)
    hmac_encoding: Mapped[str | None] = mapped_column(String(16), default=None)
    hmac_prefix: Mapped[str | None] = mapped_column(String(40), default=None)
    hmac_timestamp_header: Mapped[str | None] = mapped_column(String(100), default=None)
    type_pointer: Mapped[str | None] = mapped_column(String(200), default=None)
    handler: Mapped[str] = mapped_column(String(100), default="noop")
    max_attempts: Mapped[int] = mapped_column(Integer, default=8)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


register_encrypted_column(Source.secrets_token)


class InboxEvent(Base):
    """One accepted webhook, kept verbatim; (source_id, dedup_key) makes duplicates visible."""

    __tablename__ = "ingest_events"
    __table_args__ = (
        UniqueConstraint("source_id", "dedup_key", name="uq_ingest_events_source_id_dedup_key"),
        Index("ix_ingest_events_tenant_id_id", "tenant_id", "id"),
        Index("ix_ingest_events_source_id_received_at", "source_id", "received_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    source_id: Mapped[str] = mapped_column(String(40), ForeignKey("ingest_sources.id"))
    dedup_key: Mapped[str] = mapped_column(String(300))
    type: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str | None] = mapped_column(String(200), default=None)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    received_at: Mapped[dt.datetime]
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)


class Job(Base):
    """The work an event causes: queued → running → succeeded | retrying → … → dead.

    Exactly one per event; a retry or a replay sends the same job round again.
    """

    __tablename__ = "ingest_jobs"
    __table_args__ = (
        Index("ix_ingest_jobs_tenant_id_id", "tenant_id", "id"),
        # The scheduler's scans: due retries, expired leases, jobs stuck in the queue.
        Index("ix_ingest_jobs_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_ingest_jobs_source_id", "source_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    source_id: Mapped[str] = mapped_column(String(40), ForeignKey("ingest_sources.id"))
    event_id: Mapped[str] = mapped_column(String(40), ForeignKey("ingest_events.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=8)
    next_attempt_at: Mapped[dt.datetime]
    locked_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Rejection(Base):
    """A refused delivery, kept briefly for debugging: at most 100 per source, for 7 days."""

    __tablename__ = "ingest_rejections"
    __table_args__ = (Index("ix_ingest_rejections_source_id_id", "source_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    source_id: Mapped[str] = mapped_column(String(40), ForeignKey("ingest_sources.id"))
    reason: Mapped[str] = mapped_column(String(40))
    received_at: Mapped[dt.datetime]
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    body_prefix: Mapped[bytes] = mapped_column(LargeBinary)
    body_size: Mapped[int] = mapped_column(Integer)
