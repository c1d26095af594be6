"""Audit log: who did what, from where, in which request. Rows are only ever appended."""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from sqlalchemy import JSON, Index, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from relayport.core.context import request_id_var
from relayport.core.db import Base, utcnow
from relayport.core.ids import new_id
from relayport.core.repository import TenantRepository


class Actor(Protocol):
    """What an audit row needs of a principal (core.auth.principal.Principal fits)."""

    @property
    def kind(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Null for events no tenant may see (a failed login for an unknown email).
    tenant_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(80))
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str | None] = mapped_column(String(40))
    target_type: Mapped[str | None] = mapped_column(String(40))
    target_id: Mapped[str | None] = mapped_column(String(40))
    ip: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def record(
    session: AsyncSession,
    *,
    action: str,
    tenant_id: str | None,
    actor_type: str,
    actor_id: str | None,
    ip: str | None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an audit event to the caller's transaction."""
    event = AuditEvent(
        id=new_id("aud"),
        tenant_id=tenant_id,
        action=action,
        actor_type=actor_type,
        actor_id=actor_id,
        target_type=target_type,
        target_id=target_id,
        ip=ip,
        request_id=request_id_var.get(),
        details=details or {},
        created_at=utcnow(),
    )
    session.add(event)
    return event


def record_by(
    session: AsyncSession,
    actor: Actor,
    action: str,
    *,
    ip: str | None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an event done by an authenticated principal, in its own tenant."""
    return record(
        session,
        action=action,
        tenant_id=actor.tenant_id,
        actor_type=actor.kind,
        actor_id=actor.id,
        ip=ip,
        target_type=target_type,
        target_id=target_id,
        details=details,
    )


class AuditRepository(TenantRepository[AuditEvent]):
    model = AuditEvent
    not_found_detail = "no such audit event"
