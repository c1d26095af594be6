"""Tenants and their plans. Every principal belongs to exactly one tenant."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from relayport.core.db import Base, utcnow
from relayport.core.errors import NotFound
from relayport.core.ids import new_id

NAME_MAX = 200


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    plan: Mapped[str] = mapped_column(String(40), default="free")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


async def create_tenant(session: AsyncSession, *, name: str, plan: str = "free") -> Tenant:
    """Add a tenant to the session (the caller's unit of work commits it)."""
    tenant = Tenant(id=new_id("ten"), name=name, plan=plan, created_at=utcnow())
    session.add(tenant)
    await session.flush()
    return tenant


async def get_tenant(session: AsyncSession, tenant_id: str) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("no such tenant")
    return tenant
