"""GET /v1/audit-events: the tenant's audit trail, for admins."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from relayport.core.audit import AuditEvent, AuditRepository
from relayport.core.deps import Admin, ReadSessionDep
from relayport.core.schemas import ListResponse

router = APIRouter(prefix="/v1", tags=["audit"])


class AuditEventOut(BaseModel):
    id: str
    action: str
    actor_type: str
    actor_id: str | None
    target_type: str | None
    target_id: str | None
    ip: str | None
    request_id: str | None
    details: dict[str, Any]
    created_at: dt.datetime


@router.get("/audit-events", response_model=ListResponse[AuditEventOut])
async def list_audit_events(
    principal: Admin,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=80)] = None,
) -> ListResponse[AuditEventOut]:
    """Audit events of the caller's tenant, newest first; filter by `action`. Role: admin."""
    repo = AuditRepository(session, principal.tenant_id)
    stmt = repo.query()
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(
        data=[AuditEventOut.model_validate(e, from_attributes=True) for e in page.items],
        next=page.next,
    )
