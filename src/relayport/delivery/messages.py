"""Messages: accept one (idempotently, schema-checked), fan it out into one delivery per
matching endpoint, and send finished deliveries round again. Takes a session, never commits.

A message, its deliveries and the outbox row that announces it commit in one transaction, so
a message is never stored without being sent nor sent without being stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from itertools import islice
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core import audit
from relayport.core.auth.principal import Principal
from relayport.core.db import utcnow
from relayport.core.errors import Conflict, ValidationFailed
from relayport.core.ids import new_id
from relayport.core.outbox import enqueue
from relayport.core.platform import Platform
from relayport.delivery import filters, repository
from relayport.delivery.models import Message

QUEUE = "delivery.send"
MAX_SCHEMA_ERRORS = 10
WAKE_KEY = "outbox.wake"


def wake(platform: Platform) -> None:
    """Have the in-process outbox relay publish now rather than at its next poll (call after
    committing); without an in-process worker the relay's poll picks the rows up."""
    callback = platform.extras.get(WAKE_KEY)
    if callback is not None:
        callback()


def body_of(event_type: str, payload: Any, at: dt.datetime) -> bytes:
    """The Standard Webhooks payload shape: {"type", "timestamp", "data"}."""
    return orjson.dumps({"type": event_type, "timestamp": at.isoformat(), "data": payload})


def _check_payload(schema: dict[str, Any], payload: Any) -> None:
    try:
        found = list(islice(Draft202012Validator(schema).iter_errors(payload), MAX_SCHEMA_ERRORS))
    except Exception:  # e.g. a $ref to a document that is never fetched
        raise ValidationFailed(
            "the event type's schema cannot be applied (unresolvable $ref?)",
            errors=[
                {
                    "pointer": "/event_type",
                    "location": "body",
                    "message": "schema unusable",
                    "code": "schema_unusable",
                }
            ],
        ) from None
    errors = []
    for error in found:
        pointer = "/payload" + "".join(
            "/" + str(p).replace("~", "~0").replace("/", "~1") for p in error.absolute_path
        )
        errors.append(
            {
                "pointer": pointer,
                "location": "body",
                "message": error.message[:300],
                "code": "schema",
            }
        )
    if errors:
        raise ValidationFailed("the payload does not match its event type's schema", errors=errors)


async def create_message(
    session: AsyncSession,
    tenant_id: str,
    *,
    event_type: str,
    payload: Any,
    channels: Sequence[str] | None,
    idempotency_key: str | None,
    idempotency_ttl_s: float,
    validate: bool = True,
) -> tuple[Message, list[dict[str, Any]] | None, bool]:
    """Store a message with its deliveries and outbox row: (message, its deliveries when it
    was created here, created).

    A key seen within `idempotency_ttl_s` returns the original message (created False); an
    older one is released and the key starts a new message.
    """
    now = utcnow()
    if idempotency_key is not None:
        existing = await repository.message_by_key(session, tenant_id, idempotency_key)
        if existing is not None:
            if existing.created_at > now - dt.timedelta(seconds=idempotency_ttl_s):
                return existing, None, False
            await repository.release_key(session, existing.id)
    if validate:
        kind = await repository.EventTypeRepository(session, tenant_id).by_name(event_type)
        if kind is not None and kind.schema is not None:
            _check_payload(kind.schema, payload)
    message_id = new_id("msg")
    values = {
        "id": message_id,
        "tenant_id": tenant_id,
        "event_type": event_type,
        "channels": list(channels) if channels else None,
        "idempotency_key": idempotency_key,
        "body": body_of(event_type, payload, now),
        "created_at": now,
    }
    if not await repository.insert_message(session, values):
        # A concurrent request with the same key won the insert and has committed.
        assert idempotency_key is not None
        winner = await repository.message_by_key(session, tenant_id, idempotency_key)
        if winner is None:  # pragma: no cover - it committed before we looked
            raise Conflict("a concurrent request used this key", slug="idempotency-conflict")
        return winner, None, False
    message = Message(**values)
    return message, await fan_out(session, message, now), True


async def fan_out(
    session: AsyncSession, message: Message, now: dt.datetime
) -> list[dict[str, Any]]:
    """One delivery per enabled endpoint whose filters accept the message, and one outbox
    row that names the message (the worker claims all its deliveries at once). Returns the
    deliveries' columns."""
    endpoints = await repository.enabled_endpoints(session, message.tenant_id)
    rows = [
        {
            "id": new_id("dlv"),
            "tenant_id": message.tenant_id,
            "message_id": message.id,
            "endpoint_id": endpoint_id,
            "fifo": fifo,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "locked_until": None,
            "last_error": None,
            "created_at": now,
            "updated_at": now,
            "finished_at": None,
        }
        for endpoint_id, fifo, filter_types, channels in endpoints
        if filters.accepts(filter_types, channels, message.event_type, message.channels)
    ]
    if rows:
        await repository.insert_deliveries(session, rows)
        enqueue(
            session,
            topic=QUEUE,
            payload=message.id.encode(),
            tenant_id=message.tenant_id,
        )
    return rows


def enqueue_deliveries(session: AsyncSession, rows: Sequence[tuple[str, str]]) -> None:
    """Announce deliveries made claimable again: (delivery id, tenant id) each."""
    for delivery_id, tenant_id in rows:
        enqueue(session, topic=QUEUE, payload=delivery_id.encode(), tenant_id=tenant_id)


async def resend(
    session: AsyncSession,
    principal: Principal,
    *,
    action: str,
    statuses: Sequence[str],
    message_id: str | None = None,
    endpoint_id: str | None = None,
    since: dt.datetime | None = None,
    ip: str | None,
) -> int:
    """Send finished deliveries (of a message or an endpoint, since a time) again with a fresh
    attempt budget; returns how many. Unfinished ones are left to finish."""
    if message_id is not None:
        await repository.MessageRepository(session, principal.tenant_id).get(message_id)
    if endpoint_id is not None:
        await repository.EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    moved = await repository.rerun(
        session,
        tenant_id=principal.tenant_id,
        now=utcnow(),
        statuses=statuses,
        message_id=message_id,
        endpoint_id=endpoint_id,
        since=since,
    )
    enqueue_deliveries(session, [(delivery_id, principal.tenant_id) for delivery_id, _ in moved])
    audit.record_by(
        session,
        principal,
        action,
        ip=ip,
        target_type="message" if message_id else "endpoint",
        target_id=message_id or endpoint_id,
        details={"since": since.isoformat() if since else None, "deliveries": len(moved)},
    )
    return len(moved)
