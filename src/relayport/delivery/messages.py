"""Messages: accept one (idempotently, schema-checked), fan it out into one delivery per
matching endpoint, and send finished deliveries round again. Takes a session, never commits.

A message, its deliveries and the outbox row that announces it commit in one transaction, so
a message is never stored without being sent nor sent without being stored. `intake` groups
the calls of concurrent requests into one transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
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
from relayport.core.outbox import enqueue, outbox_values
from relayport.core.platform import Platform
from relayport.delivery import filters, repository
from relayport.delivery.catalog import Catalog
from relayport.delivery.models import Message

log = logging.getLogger("relayport.delivery")

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


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store: what `POST /v1/messages` (or an operational event) asks for."""

    tenant_id: str
    event_type: str
    payload: Any
    channels: tuple[str, ...] | None = None
    idempotency_key: str | None = None
    validate: bool = True


@dataclass(frozen=True, slots=True)
class Accepted:
    """A stored message; `deliveries` are its deliveries' columns when known without a read
    (created here, or a repeat of a key created in the same batch), else None."""

    message: Message
    deliveries: list[dict[str, Any]] | None
    created: bool
    # The id of the outbox row announcing a created message with deliveries.
    announcement: str | None = None
    # Set when its deliveries were stored already claimed by this process, leased until
    # then (`store_messages(claim_until=…)`): it sends them itself, without a broker message.
    claimed_until: dt.datetime | None = None
    # What `intake` hands to the sender for such a message (sender.Job each).
    jobs: list[Any] | None = None


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
    """Store a message with its deliveries and outbox row in the caller's transaction:
    (message, its deliveries when it was created here, created).

    A key seen within `idempotency_ttl_s` returns the original message (created False); an
    older one is released and the key starts a new message.
    """
    item = NewMessage(
        tenant_id,
        event_type,
        payload,
        tuple(channels) if channels else None,
        idempotency_key,
        validate,
    )
    (result,) = await store_messages(session, [item], idempotency_ttl_s=idempotency_ttl_s)
    if isinstance(result, Exception):
        raise result
    return result.message, result.deliveries if result.created else None, result.created


async def store_messages(
    session: AsyncSession,
    items: Sequence[NewMessage],
    *,
    idempotency_ttl_s: float,
    publish_grace_s: float = 0,
    catalog: Catalog | None = None,
    claim_until: dt.datetime | None = None,
) -> list[Accepted | Exception]:
    """Store messages in the caller's transaction, with as few statements as a batch allows:
    one result per item (an `Accepted`, or the exception its caller gets).

    With `publish_grace_s`, the outbox rows become due for the relay only that much later:
    the caller publishes them itself once committed (`intake.publish_soon`). With `catalog`, the
    endpoints and event-type schemas come from the process's versioned cache. With
    `claim_until`, see `fan_out_many`."""
    now = utcnow()
    results: list[Accepted | Exception | None] = [None] * len(items)
    # Repeats of one key inside the batch follow its first item.
    leaders: dict[tuple[str, str], int] = {}
    followers: dict[int, int] = {}
    for index, item in enumerate(items):
        if item.idempotency_key is None:
            continue
        key = (item.tenant_id, item.idempotency_key)
        if key in leaders:
            followers[index] = leaders[key]
        else:
            leaders[key] = index
    todo = [i for i in range(len(items)) if i not in followers]
    endpoints: dict[str, list[Any]] | None = None
    if catalog is not None:
        wanted: dict[str, set[str]] = {}
        for i in todo:
            wanted.setdefault(items[i].tenant_id, set()).add(items[i].event_type)
        endpoints, schemas = await catalog.fan_out_view(session, wanted)
    else:
        schemas = await repository.event_type_schemas(
            session, {(items[i].tenant_id, items[i].event_type) for i in todo if items[i].validate}
        )
    rows: dict[int, dict[str, Any]] = {}
    refused: dict[int, ValidationFailed] = {}
    for index in todo:
        item = items[index]
        schema = schemas.get((item.tenant_id, item.event_type)) if item.validate else None
        if schema is not None:
            try:
                _check_payload(schema, item.payload)
            except ValidationFailed as exc:
                refused[index] = exc
                continue
        rows[index] = {
            "id": new_id("msg"),
            "tenant_id": item.tenant_id,
            "event_type": item.event_type,
            "channels": list(item.channels) if item.channels else None,
            "idempotency_key": item.idempotency_key,
            "body": body_of(item.event_type, item.payload, now),
            "created_at": now,
        }
    # Insert first: a new key (the common case) costs no lookup. A key already taken shows as
    # a row not inserted, and only those keys (and those of refused payloads, since a repeat
    # gets its original even if the schema changed since) are looked up.
    inserted = await repository.insert_messages(session, list(rows.values()))
    taken = [i for i, row in rows.items() if row["id"] not in inserted]
    check = taken + [i for i in refused if items[i].idempotency_key is not None]
    if check:
        existing = await repository.messages_by_keys(
            session, [(items[i].tenant_id, items[i].idempotency_key or "") for i in check]
        )
        fresh_after = now - dt.timedelta(seconds=idempotency_ttl_s)
        expired: dict[int, str] = {}
        for index in check:
            found = existing.get((items[index].tenant_id, items[index].idempotency_key or ""))
            if found is not None and found.created_at > fresh_after:
                results[index] = Accepted(found, None, False)
            elif found is not None and index in rows:
                expired[index] = found.id  # older than the window: the key starts anew
            elif index in rows:  # pragma: no cover - the holder was deleted in between
                results[index] = Conflict(
                    "a concurrent request used this key", slug="idempotency-conflict"
                )
        if expired:
            await repository.release_keys(session, list(expired.values()))
            again = await repository.insert_messages(session, [rows[i] for i in expired])
            inserted |= again
            for index in expired:
                if rows[index]["id"] not in again:  # pragma: no cover - a concurrent repeat
                    results[index] = Conflict(
                        "a concurrent request used this key", slug="idempotency-conflict"
                    )
    for index, refusal in refused.items():
        if results[index] is None:
            results[index] = refusal
    created = {
        i: Message(**row) for i, row in rows.items() if row["id"] in inserted and results[i] is None
    }
    fanned, announced, claimed = await fan_out_many(
        session,
        list(created.values()),
        now,
        due_in_s=publish_grace_s,
        endpoints=endpoints,
        claim_until=claim_until,
    )
    for index, message in created.items():
        results[index] = Accepted(
            message,
            fanned[message.id],
            True,
            announced.get(message.id),
            claim_until if message.id in claimed else None,
        )
    for index, leader in followers.items():
        first = results[leader]
        results[index] = (
            Accepted(first.message, first.deliveries, False)
            if isinstance(first, Accepted)
            else first
        )
    return [r if r is not None else RuntimeError("message left unstored") for r in results]


async def fan_out_many(
    session: AsyncSession,
    stored: Sequence[Message],
    now: dt.datetime,
    *,
    due_in_s: float = 0,
    endpoints: dict[str, list[Any]] | None = None,
    claim_until: dt.datetime | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str], set[str]]:
    """One delivery per enabled endpoint whose filters accept each message, and one outbox
    row per message that has any (the worker claims all its deliveries at once), due for the
    relay `due_in_s` from now: one insert of each for the whole batch. Returns each message's
    deliveries' columns, the outbox row id of each message that has deliveries, and the ids
    of the messages whose deliveries were stored claimed.

    With `claim_until` (a process that sends its own messages, `intake`), the deliveries of
    a message without FIFO endpoints are stored already claimed for their first attempt,
    leased until then, exactly as a worker's claim would leave them: no claim transaction,
    no broker message. Their outbox row becomes due only when the lease ends; the worker
    marks it sent with the outcomes. If the process dies first, the relay announces the
    message then and the scheduler finds the expired leases: sent again with the same
    `webhook-id`, the lost attempt given back."""
    endpoints = dict(endpoints or {})
    for tenant_id in {m.tenant_id for m in stored} - set(endpoints):
        endpoints[tenant_id] = await repository.enabled_endpoints(session, tenant_id)
    out: dict[str, list[dict[str, Any]]] = {}
    announced: dict[str, str] = {}
    claimed: set[str] = set()
    due = now + dt.timedelta(seconds=due_in_s)
    deliveries: list[dict[str, Any]] = []
    announcements: list[dict[str, Any]] = []
    for message in stored:
        rows = [
            _delivery(message, endpoint_id, fifo, now)
            for endpoint_id, fifo, filter_types, channels in endpoints[message.tenant_id]
            if filters.accepts(filter_types, channels, message.event_type, message.channels)
        ]
        out[message.id] = rows
        if rows:
            # FIFO deliveries wait for their predecessors: the worker's claim checks that.
            claim = claim_until is not None and not any(r["fifo"] for r in rows)
            if claim:
                claimed.add(message.id)
                for r in rows:
                    r.update(
                        status="sending",
                        attempts=1,
                        locked_until=claim_until,
                        next_attempt_at=claim_until,
                    )
            deliveries += rows
            row = outbox_values(
                topic=QUEUE, payload=message.id.encode(), tenant_id=message.tenant_id, now=now
            )
            row["available_at"] = claim_until if claim else due
            announcements.append(row)
            announced[message.id] = row["message_id"]
    await repository.insert_deliveries(session, deliveries)
    await repository.insert_outbox(session, announcements)
    return out, announced, claimed


def _delivery(message: Message, endpoint_id: str, fifo: bool, now: dt.datetime) -> dict[str, Any]:
    return {
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
