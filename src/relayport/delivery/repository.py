"""Every query of outbound webhooks: tenant-scoped reads through `TenantRepository`, plus the
worker's statements, which act on rows whose tenant is known from a message or delivery id."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.outbox import OutboxMessage
from relayport.core.repository import TenantRepository
from relayport.delivery.models import (
    FINISHED,
    Attempt,
    Delivery,
    Endpoint,
    EventType,
    Message,
    TenantSettings,
)


class EndpointRepository(TenantRepository[Endpoint]):
    model = Endpoint
    not_found_detail = "no such endpoint"


class EventTypeRepository(TenantRepository[EventType]):
    model = EventType
    not_found_detail = "no such event type"

    async def by_name(self, name: str) -> EventType | None:
        result = await self.session.execute(self.query().where(EventType.name == name))
        return result.scalar_one_or_none()


class MessageRepository(TenantRepository[Message]):
    model = Message
    not_found_detail = "no such message"


class DeliveryRepository(TenantRepository[Delivery]):
    model = Delivery
    not_found_detail = "no such delivery"

    async def of_message(self, message_id: str) -> list[Delivery]:
        stmt = self.query().where(Delivery.message_id == message_id).order_by(Delivery.id)
        return list((await self.session.execute(stmt)).scalars())


class AttemptRepository(TenantRepository[Attempt]):
    model = Attempt
    not_found_detail = "no such attempt"


# Core tables for the hot statements: ORM-enabled DML costs a good deal more per statement.
_table = cast(Table, Delivery.__table__)
_d = _table.c
_messages = cast(Table, Message.__table__)
_outbox = cast(Table, OutboxMessage.__table__)
_attempts = cast(Table, Attempt.__table__)
_tenant_settings = cast(Table, TenantSettings.__table__)


def _insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


async def insert_messages(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> set[str]:
    """One INSERT … ON CONFLICT (tenant_id, idempotency_key) DO NOTHING for many messages;
    the ids of those inserted. Concurrent posts with one key race on the unique index:
    exactly one inserts."""
    if not rows:
        return set()
    conn = await session.connection()
    stmt = _INSERT_MESSAGES.get(conn.dialect.name)
    if stmt is None:
        # Built once per dialect and run as an executemany, which SQLAlchemy sends as one
        # multi-row INSERT ("insertmanyvalues"): `.values(rows)` made a statement without a
        # cache key, compiled again for every batch.
        stmt = _INSERT_MESSAGES[conn.dialect.name] = (
            _insert(session)(_messages)
            .on_conflict_do_nothing(index_elements=["tenant_id", "idempotency_key"])
            .returning(_messages.c.id)
        )
    return set((await conn.execute(stmt, list(rows))).scalars())


_INSERT_MESSAGES: dict[str, Any] = {}


async def messages_by_keys(
    session: AsyncSession, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], Message]:
    """The messages holding some (tenant id, idempotency key) pairs, by pair."""
    by_tenant: dict[str, set[str]] = {}
    for tenant_id, key in keys:
        by_tenant.setdefault(tenant_id, set()).add(key)
    if not by_tenant:
        return {}
    stmt = select(Message).where(
        or_(
            *(
                and_(Message.tenant_id == tenant_id, Message.idempotency_key.in_(sorted(names)))
                for tenant_id, names in by_tenant.items()
            )
        )
    )
    found = (await session.execute(stmt)).scalars()
    return {(m.tenant_id, m.idempotency_key or ""): m for m in found}


async def release_keys(session: AsyncSession, message_ids: Sequence[str]) -> None:
    """Free the idempotency keys of messages older than the idempotency window."""
    await session.execute(
        update(Message)
        .where(Message.id.in_(list(message_ids)))
        .values(idempotency_key=None)
        .execution_options(synchronize_session=False)
    )


async def event_type_schemas(
    session: AsyncSession, names: set[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """The JSON Schemas of some (tenant id, event type) pairs, for those that have one."""
    by_tenant: dict[str, set[str]] = {}
    for tenant_id, name in names:
        by_tenant.setdefault(tenant_id, set()).add(name)
    if not by_tenant:
        return {}
    stmt = select(EventType.tenant_id, EventType.name, EventType.schema).where(
        or_(
            *(
                and_(EventType.tenant_id == tenant_id, EventType.name.in_(sorted(types)))
                for tenant_id, types in by_tenant.items()
            )
        ),
        EventType.schema.is_not(None),
    )
    rows = (await session.execute(stmt)).all()
    return {(r[0], r[1]): r[2] for r in rows if r[2] is not None}


def _mark_announced(outbox_ids: Sequence[str], now: dt.datetime) -> Any:
    """Mark outbox rows whose message a worker received as sent (those still unsent)."""
    return (
        update(_outbox)
        .where(_outbox.c.id.in_(sorted(set(outbox_ids))), _outbox.c.sent_at.is_(None))
        .values(sent_at=now, attempts=_outbox.c.attempts + 1)
    )


async def mark_announced(
    session: AsyncSession, outbox_ids: Sequence[str], now: dt.datetime
) -> None:
    """Mark the outbox rows of messages whose deliveries were claimed at storing as sent."""
    if outbox_ids:
        conn = await session.connection()
        await conn.execute(_mark_announced(outbox_ids, now))


async def endpoints_by_ids(session: AsyncSession, endpoint_ids: Sequence[str]) -> list[Endpoint]:
    """Endpoints by id (the worker's reads act on ids it already holds)."""
    if not endpoint_ids:
        return []
    stmt = select(Endpoint).where(Endpoint.id.in_(sorted(set(endpoint_ids))))
    return list((await session.execute(stmt)).scalars())


async def insert_attempts(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Attempt rows, in one executemany."""
    if rows:
        conn = await session.connection()
        await conn.execute(insert(_attempts), list(rows))


async def insert_outbox(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Outbox rows (`outbox_values`), in one executemany."""
    if rows:
        conn = await session.connection()
        await conn.execute(insert(_outbox), list(rows))


async def enabled_endpoints(session: AsyncSession, tenant_id: str) -> list[Any]:
    """(id, fifo, filter_types, channels) of the tenant's enabled endpoints: the columns fan-out
    needs, without building ORM objects (or reading secrets) for each of them."""
    stmt = select(Endpoint.id, Endpoint.fifo, Endpoint.filter_types, Endpoint.channels).where(
        Endpoint.tenant_id == tenant_id, Endpoint.enabled.is_(True)
    )
    return list((await session.execute(stmt)).all())


async def insert_deliveries(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """One executemany, without the unit of work (100 endpoints are 100 rows per message)."""
    if rows:
        conn = await session.connection()
        await conn.execute(insert(_table), list(rows))


async def delete_endpoint_rows(session: AsyncSession, endpoint_id: str) -> None:
    for model in (Attempt, Delivery):
        await session.execute(
            delete(model)
            .where(model.endpoint_id == endpoint_id)
            .execution_options(synchronize_session=False)
        )
    await session.execute(
        delete(Endpoint)
        .where(Endpoint.id == endpoint_id)
        .execution_options(synchronize_session=False)
    )


# --- the sender -------------------------------------------------------------------------------


def _build_fifo_free() -> Any:
    # A FIFO delivery waits while an older delivery to the same endpoint is unfinished.
    older = _table.alias("older")
    return or_(
        _d.fifo.is_(False),
        ~exists().where(
            older.c.endpoint_id == _d.endpoint_id,
            older.c.id < _d.id,
            older.c.status.not_in(FINISHED),
        ),
    )


# Built once: a fresh alias per claim would cost a new cache key every time.
_FIFO_FREE = _build_fifo_free()


def _fifo_free() -> Any:
    return _FIFO_FREE


def _claim_update(now: Any, lease_until: Any, message_ids: Any, delivery_ids: Any) -> Any:
    """The guarded UPDATE that takes due deliveries for one attempt each; the arguments are
    values or bind parameters."""
    return (
        update(_table)
        .where(
            _d.status.in_(("pending", "retrying")),
            _d.next_attempt_at <= now,
            _fifo_free(),
            or_(_d.message_id.in_(message_ids), _d.id.in_(delivery_ids)),
        )
        .values(
            status="sending",
            attempts=_d.attempts + 1,
            locked_until=lease_until,
            next_attempt_at=lease_until,
            updated_at=now,
        )
        .returning(_d.id, _d.endpoint_id, _d.message_id, _d.attempts)
    )


def _build_claim_and_load(announced: bool) -> Any:
    """The statement of `claim_and_load`, built once per variant: with expanding bind
    parameters its cache key and compiled form are reused, where building it per claim cost
    more CPU than the round trip it saves."""
    now = bindparam("now", type_=_d.updated_at.type)
    lease = bindparam("lease_until", type_=_d.locked_until.type)
    claimed = _claim_update(
        now,
        lease,
        bindparam("message_ids", expanding=True),
        bindparam("delivery_ids", expanding=True),
    ).cte("claimed")
    stmt = (
        select(claimed.c.id, claimed.c.endpoint_id, claimed.c.message_id, claimed.c.attempts)
        .add_columns(Message, Endpoint)
        .select_from(claimed)
        .join(Message, Message.id == claimed.c.message_id)
        .join(Endpoint, Endpoint.id == claimed.c.endpoint_id)
    )
    if announced:
        marked = (
            update(_outbox)
            .where(
                _outbox.c.id.in_(bindparam("announced", expanding=True)),
                _outbox.c.sent_at.is_(None),
            )
            .values(sent_at=now, attempts=_outbox.c.attempts + 1)
            .returning(_outbox.c.id)
            .cte("marked")
        )
        stmt = stmt.add_cte(marked)
    return stmt


_CLAIM_AND_LOAD = {flag: _build_claim_and_load(flag) for flag in (False, True)}


async def claim_and_load(
    session: AsyncSession,
    *,
    now: dt.datetime,
    lease_until: dt.datetime,
    message_ids: Sequence[str] = (),
    delivery_ids: Sequence[str] = (),
    announced: Sequence[str] = (),
) -> list[tuple[str, str, str, int, Message, Endpoint]]:
    """PostgreSQL: `claim` and `load_for_send` in one statement (data-modifying CTEs), so a
    claim costs one round trip and needs no transaction around it: run on an autocommit
    connection, it commits by itself. (delivery id, endpoint id, message id, attempt,
    message, endpoint) per claimed delivery."""
    params: dict[str, Any] = {
        "now": now,
        "lease_until": lease_until,
        "message_ids": list(message_ids),
        "delivery_ids": list(delivery_ids),
    }
    if announced:
        params["announced"] = sorted(set(announced))
    rows = (await session.execute(_CLAIM_AND_LOAD[bool(announced)], params)).all()
    return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


async def claim(
    session: AsyncSession,
    *,
    now: dt.datetime,
    lease_until: dt.datetime,
    message_ids: Sequence[str] = (),
    delivery_ids: Sequence[str] = (),
    announced: Sequence[str] = (),
) -> list[tuple[str, str, str, int]]:
    """Take the due deliveries of some messages and some single deliveries for one attempt
    each: (delivery id, endpoint id, message id, attempt number).

    One guarded UPDATE: two workers handed the same work cannot both win a row. `announced`
    are the outbox rows of the broker messages that named them, marked sent in the same
    statement on PostgreSQL (a data-modifying CTE), just before it on SQLite.
    """
    stmt = _claim_update(now, lease_until, list(message_ids), list(delivery_ids))
    conn = await session.connection()
    if announced and conn.dialect.name == "postgresql":
        stmt = stmt.add_cte(_mark_announced(announced, now).returning(_outbox.c.id).cte("marked"))
    elif announced:
        await conn.execute(_mark_announced(announced, now))
    result = await conn.execute(stmt)
    return [(r[0], r[1], r[2], r[3]) for r in result.all()]


async def tenant_settings(session: AsyncSession, tenant_id: str) -> TenantSettings | None:
    return await session.get(TenantSettings, tenant_id)


async def set_tenant_schedule(
    session: AsyncSession, tenant_id: str, schedule: list[float] | None
) -> None:
    await session.execute(
        update(TenantSettings)
        .where(TenantSettings.tenant_id == tenant_id)
        .values(retry_schedule_s=schedule)
        .execution_options(synchronize_session=False)
    )


async def tenant_versions(
    session: AsyncSession, tenant_ids: Sequence[str]
) -> dict[str, dt.datetime]:
    """The tenants' catalog versions (see `catalog`), for those that have a settings row."""
    conn = await session.connection()
    rows = await conn.execute(
        select(_tenant_settings.c.tenant_id, _tenant_settings.c.updated_at).where(
            _tenant_settings.c.tenant_id.in_(sorted(set(tenant_ids)))
        )
    )
    return {r[0]: r[1] for r in rows.all()}


async def bump_tenant_version(session: AsyncSession, tenant_id: str, now: dt.datetime) -> None:
    """Move a tenant's catalog version forward (to now, or a microsecond past the current
    one if that is not earlier), creating its settings row if need be; the row stays locked
    until the caller's transaction ends."""
    await session.execute(
        _insert(session)(TenantSettings)
        .values(tenant_id=tenant_id, retry_schedule_s=None, updated_at=now)
        .on_conflict_do_nothing(index_elements=["tenant_id"])
        .execution_options(synchronize_session=False)
    )
    stmt = select(TenantSettings.updated_at).where(TenantSettings.tenant_id == tenant_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    current = (await session.execute(stmt)).scalar_one()
    version = max(now, current + dt.timedelta(microseconds=1))
    await session.execute(
        update(TenantSettings)
        .where(TenantSettings.tenant_id == tenant_id)
        .values(updated_at=version)
        .execution_options(synchronize_session=False)
    )


async def tenant_schedules(
    session: AsyncSession, tenant_ids: Sequence[str]
) -> dict[str, list[float]]:
    """The tenants' own retry schedules, for those that set one."""
    rows = await session.execute(
        select(TenantSettings.tenant_id, TenantSettings.retry_schedule_s).where(
            TenantSettings.tenant_id.in_(set(tenant_ids)),
            TenantSettings.retry_schedule_s.is_not(None),
        )
    )
    return {r[0]: list(r[1]) for r in rows.all() if r[1]}


async def load_for_send(
    session: AsyncSession, delivery_ids: Sequence[str]
) -> tuple[dict[str, Message], dict[str, Endpoint]]:
    """The messages and endpoints of some deliveries, by id, in one query (a message with
    many deliveries comes back on each of their rows, but is built once)."""
    rows = await session.execute(
        select(Message, Endpoint)
        .select_from(Delivery)
        .join(Message, Message.id == Delivery.message_id)
        .join(Endpoint, Endpoint.id == Delivery.endpoint_id)
        .where(Delivery.id.in_(sorted(set(delivery_ids))))
    )
    messages: dict[str, Message] = {}
    endpoints: dict[str, Endpoint] = {}
    for message, endpoint in rows.all():
        messages[message.id] = message
        endpoints[endpoint.id] = endpoint
    return messages, endpoints


# Built once: its cache key and compiled form are reused by every outcome batch.
_FINISH = (
    update(_table)
    .where(
        _d.id == bindparam("b_id"),
        _d.status == "sending",
        _d.attempts == bindparam("b_attempt"),
        # The lease is the claim's token: a worker that overran its lease and lost the
        # delivery to another must not overwrite that one's attempt.
        _d.locked_until == bindparam("b_lease"),
    )
    .values(
        status=bindparam("b_status"),
        attempts=_d.attempts + bindparam("b_attempt_delta"),
        next_attempt_at=bindparam("b_next"),
        locked_until=None,
        last_error=bindparam("b_error"),
        updated_at=bindparam("b_now"),
        finished_at=bindparam("b_finished"),
    )
)


async def finish(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Record attempt outcomes (one executemany), unless the delivery moved on without us."""
    if not rows:
        return
    conn = await session.connection()
    await conn.execute(_FINISH, list(rows))


async def next_fifo(session: AsyncSession, endpoint_ids: Sequence[str]) -> list[tuple[str, str]]:
    """The oldest unfinished FIFO delivery of each endpoint: (delivery id, tenant id)."""
    out: list[tuple[str, str]] = []
    for endpoint_id in endpoint_ids:
        row = (
            await session.execute(
                select(Delivery.id, Delivery.tenant_id)
                .where(
                    Delivery.endpoint_id == endpoint_id,
                    Delivery.status.in_(("pending", "retrying")),
                )
                .order_by(Delivery.id)
                .limit(1)
            )
        ).first()
        if row is not None:
            out.append((row[0], row[1]))
    return out


# --- the scheduler ----------------------------------------------------------------------------


def _dispatchable(now: dt.datetime, stuck_before: dt.datetime) -> Any:
    return or_(
        and_(Delivery.status == "retrying", Delivery.next_attempt_at <= now),
        and_(Delivery.status == "sending", Delivery.next_attempt_at < now),
        and_(Delivery.status == "pending", Delivery.next_attempt_at < stuck_before),
    )


async def dispatchable(
    session: AsyncSession, *, now: dt.datetime, stuck_before: dt.datetime, limit: int
) -> list[str]:
    stmt = (
        select(Delivery.id)
        .where(_dispatchable(now, stuck_before))
        .order_by(Delivery.next_attempt_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)  # several workers' schedulers share
    return list((await session.execute(stmt)).scalars())


async def requeue(
    session: AsyncSession, ids: Sequence[str], *, now: dt.datetime, stuck_before: dt.datetime
) -> list[tuple[str, str]]:
    """Make dispatchable deliveries claimable now; (id, tenant_id) of those moved. An expired
    lease gives its attempt back: the worker died, the receiver may never have seen it."""
    result = await session.execute(
        update(Delivery)
        .where(Delivery.id.in_(ids), _dispatchable(now, stuck_before))
        .values(
            status="pending",
            attempts=case(
                (Delivery.status == "sending", Delivery.attempts - 1), else_=Delivery.attempts
            ),
            locked_until=None,
            next_attempt_at=now,
            updated_at=now,
        )
        .returning(Delivery.id, Delivery.tenant_id)
        .execution_options(synchronize_session=False)
    )
    return [(r[0], r[1]) for r in result.all()]


async def rerun(
    session: AsyncSession,
    *,
    tenant_id: str,
    now: dt.datetime,
    statuses: Sequence[str],
    message_id: str | None = None,
    endpoint_id: str | None = None,
    since: dt.datetime | None = None,
) -> list[tuple[str, str]]:
    """Send finished deliveries round again with a fresh attempt budget: (id, message id)."""
    stmt = update(Delivery).where(Delivery.tenant_id == tenant_id, Delivery.status.in_(statuses))
    if message_id is not None:
        stmt = stmt.where(Delivery.message_id == message_id)
    if endpoint_id is not None:
        stmt = stmt.where(Delivery.endpoint_id == endpoint_id)
    if since is not None:
        stmt = stmt.where(Delivery.created_at >= since)
    result = await session.execute(
        stmt.values(
            status="pending",
            attempts=0,
            next_attempt_at=now,
            locked_until=None,
            last_error=None,
            finished_at=None,
            updated_at=now,
        )
        .returning(Delivery.id, Delivery.message_id)
        .execution_options(synchronize_session=False)
    )
    return [(r[0], r[1]) for r in result.all()]
