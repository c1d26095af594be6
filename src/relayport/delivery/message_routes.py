"""HTTP routes of the event-type catalog and of messages (mounted through `routes.router`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import AwareDatetime
from sqlalchemy import exists

from relayport.core.deps import (
    Operator,
    PlatformDep,
    ReadSessionDep,
    SessionDep,
    Viewer,
    after_commit,
    client_ip,
)
from relayport.core.paging import After, Limit
from relayport.core.schemas import ListResponse
from relayport.delivery import health, intake, messages, service
from relayport.delivery.models import Attempt, Delivery, EventType, Message
from relayport.delivery.repository import (
    AttemptRepository,
    DeliveryRepository,
    EventTypeRepository,
    MessageRepository,
)
from relayport.delivery.schemas import (
    AttemptOut,
    DeliveryOut,
    DeliveryStatus,
    EventTypeCreate,
    EventTypeOut,
    EventTypeUpdate,
    MessageCreate,
    MessageOut,
    Requeued,
    RetryBody,
)

router = APIRouter(prefix="/v1")

Since = Annotated[AwareDatetime | None, Query(description="RFC 3339 with an offset.")]
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
]


# --- event types ------------------------------------------------------------------------------


def _event_type(row: EventType) -> EventTypeOut:
    return EventTypeOut(
        id=row.id,
        name=row.name,
        description=row.description,
        schema_=row.schema,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@router.post("/event-types", status_code=201, response_model=EventTypeOut, tags=["event-types"])
async def create_event_type(
    body: EventTypeCreate, request: Request, principal: Operator, session: SessionDep
) -> EventTypeOut:
    """Add an event type, optionally with a JSON Schema (2020-12) for its payloads.
    Role: operator."""
    row = await service.create_event_type(
        session,
        principal,
        name=body.name,
        description=body.description,
        schema=body.schema_,
        ip=client_ip(request),
    )
    return _event_type(row)


@router.get("/event-types", response_model=ListResponse[EventTypeOut], tags=["event-types"])
async def list_event_types(
    principal: Viewer, session: ReadSessionDep, limit: Limit = 50, after: After = None
) -> ListResponse[EventTypeOut]:
    """The tenant's event types, newest first. Role: viewer."""
    page = await EventTypeRepository(session, principal.tenant_id).page(limit=limit, after=after)
    return ListResponse(data=[_event_type(r) for r in page.items], next=page.next)


@router.get("/event-types/{event_type}", response_model=EventTypeOut, tags=["event-types"])
async def get_event_type(
    event_type: str, principal: Viewer, session: ReadSessionDep
) -> EventTypeOut:
    """One event type, by name. Role: viewer."""
    return _event_type(await service.get_event_type(session, principal.tenant_id, event_type))


@router.patch("/event-types/{event_type}", response_model=EventTypeOut, tags=["event-types"])
async def update_event_type(
    event_type: str,
    body: EventTypeUpdate,
    request: Request,
    principal: Operator,
    session: SessionDep,
) -> EventTypeOut:
    """Change an event type's description or schema (`"schema": null` drops it). Role: operator."""
    changes: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set}
    row = await service.update_event_type(
        session, principal, event_type, changes, ip=client_ip(request)
    )
    return _event_type(row)


@router.delete("/event-types/{event_type}", status_code=204, tags=["event-types"])
async def delete_event_type(
    event_type: str, request: Request, principal: Operator, session: SessionDep
) -> Response:
    """Remove an event type from the catalog. Role: operator."""
    await service.delete_event_type(session, principal, event_type, ip=client_ip(request))
    return Response(status_code=204)


# --- messages ---------------------------------------------------------------------------------


def _message(
    row: Message, deliveries: Sequence[Delivery | dict[str, Any]] | None = None
) -> MessageOut:
    import orjson

    body = orjson.loads(row.body)
    return MessageOut(
        id=row.id,
        event_type=row.event_type,
        channels=row.channels,
        event_id=row.idempotency_key,
        payload=body.get("data"),
        created_at=row.created_at,
        deliveries=None
        if deliveries is None
        else [DeliveryOut.model_validate(d, from_attributes=True) for d in deliveries],
    )


@router.post(
    "/messages",
    status_code=202,
    response_model=MessageOut,
    tags=["messages"],
    responses={200: {"model": MessageOut, "description": "A repeat of an idempotency key."}},
)
async def create_message(
    body: MessageCreate,
    response: Response,
    principal: Operator,
    platform: PlatformDep,
    idempotency_key: IdempotencyKey = None,
) -> MessageOut:
    """Send a message to every enabled endpoint whose filters accept it. 202 once it is
    stored with its deliveries; 200 with the original for a key seen in the last 24 h.
    Role: operator."""
    # Stored together with the messages other requests post at the same moment (one
    # transaction for all of them); this returns once that transaction has committed.
    accepted = await intake.accept(
        platform,
        messages.NewMessage(
            principal.tenant_id,
            body.event_type,
            body.payload,
            tuple(body.channels) if body.channels else None,
            idempotency_key or body.event_id,
        ),
    )
    if accepted.created:
        health.wake(platform)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    if accepted.deliveries is not None:
        return _message(accepted.message, accepted.deliveries)
    async with platform.db.reads() as session:
        stored = await DeliveryRepository(session, principal.tenant_id).of_message(
            accepted.message.id
        )
    return _message(accepted.message, stored)


@router.get("/messages", response_model=ListResponse[MessageOut], tags=["messages"])
async def list_messages(
    principal: Viewer,
    session: ReadSessionDep,
    event_type: Annotated[str | None, Query(max_length=200)] = None,
    status: DeliveryStatus | None = Query(
        default=None, description="Messages with a delivery in this status."
    ),
    since: Since = None,
    until: Since = None,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[MessageOut]:
    """Messages, newest first. Role: viewer."""
    repo = MessageRepository(session, principal.tenant_id)
    stmt = repo.query()
    if event_type is not None:
        stmt = stmt.where(Message.event_type == event_type)
    if status is not None:
        stmt = stmt.where(
            exists().where(Delivery.message_id == Message.id, Delivery.status == status)
        )
    if since is not None:
        stmt = stmt.where(Message.created_at >= since)
    if until is not None:
        stmt = stmt.where(Message.created_at < until)
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(data=[_message(m) for m in page.items], next=page.next)


@router.get("/messages/{message_id}", response_model=MessageOut, tags=["messages"])
async def get_message(message_id: str, principal: Viewer, session: ReadSessionDep) -> MessageOut:
    """One message with its deliveries. Role: viewer."""
    message = await MessageRepository(session, principal.tenant_id).get(message_id)
    deliveries = await DeliveryRepository(session, principal.tenant_id).of_message(message.id)
    return _message(message, deliveries)


@router.get(
    "/messages/{message_id}/attempts", response_model=ListResponse[AttemptOut], tags=["messages"]
)
async def message_attempts(
    message_id: str,
    principal: Viewer,
    session: ReadSessionDep,
    succeeded: bool | None = None,
    since: Since = None,
    until: Since = None,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[AttemptOut]:
    """Every attempt made for a message, newest first. Role: viewer."""
    await MessageRepository(session, principal.tenant_id).get(message_id)
    return await attempts_page(
        session,
        principal.tenant_id,
        Attempt.message_id == message_id,
        succeeded=succeeded,
        since=since,
        until=until,
        limit=limit,
        after=after,
    )


@router.post("/messages/{message_id}/retry", response_model=Requeued, tags=["messages"])
async def retry_message(
    message_id: str,
    body: RetryBody,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> Requeued:
    """Send the message again to every endpoint whose delivery finished (dead or succeeded),
    or to `endpoint_id` only. Role: operator."""
    count = await messages.resend(
        session,
        principal,
        action="message.retried",
        statuses=("succeeded", "dead"),
        message_id=message_id,
        endpoint_id=body.endpoint_id,
        ip=client_ip(request),
    )
    after_commit(session, lambda: health.wake(platform))
    return Requeued(deliveries=count)


async def attempts_page(
    session: Any,
    tenant_id: str,
    scope: Any,
    *,
    succeeded: bool | None,
    since: Any,
    until: Any,
    limit: int,
    after: str | None,
) -> ListResponse[AttemptOut]:
    repo = AttemptRepository(session, tenant_id)
    stmt = repo.query().where(scope)
    if succeeded is not None:
        stmt = stmt.where(Attempt.succeeded.is_(succeeded))
    if since is not None:
        stmt = stmt.where(Attempt.created_at >= since)
    if until is not None:
        stmt = stmt.where(Attempt.created_at < until)
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(
        data=[AttemptOut.model_validate(a, from_attributes=True) for a in page.items],
        next=page.next,
    )
