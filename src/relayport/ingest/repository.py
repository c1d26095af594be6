"""Every query of inbound webhooks: tenant-scoped reads through `TenantRepository`, plus the
few statements of the hot paths (the public ingest endpoint and the worker), which act on rows
whose tenant is already known from a source or a job id."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from typing import Any, cast

import orjson
from sqlalchemy import Select, Table, and_, delete, or_, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from relayport.core.db import Base
from relayport.core.repository import TenantRepository
from relayport.core.tenants import Tenant
from relayport.ingest.models import InboxEvent, Job, Rejection, Source

RERUNNABLE = ("succeeded", "dead")


class SourceRepository(TenantRepository[Source]):
    model = Source
    not_found_detail = "no such source"


class EventRepository(TenantRepository[InboxEvent]):
    model = InboxEvent
    not_found_detail = "no such event"

    def listing(self) -> Select[InboxEvent]:
        """The base query for lists: bodies (up to 10 MiB each) stay in the database."""
        return self.query().options(defer(InboxEvent.body, raiseload=True))


class JobRepository(TenantRepository[Job]):
    model = Job
    not_found_detail = "no such job"


class RejectionRepository(TenantRepository[Rejection]):
    model = Rejection
    not_found_detail = "no such rejection"


# --- the ingest endpoint ----------------------------------------------------------------------


async def source_with_plan(session: AsyncSession, source_id: str) -> tuple[Source, str] | None:
    """A source and its tenant's plan, by id alone: the public endpoint's id names the tenant."""
    row = (
        await session.execute(
            select(Source, Tenant.plan)
            .join(Tenant, Tenant.id == Source.tenant_id)
            .where(Source.id == source_id)
        )
    ).first()
    return None if row is None else (row[0], row[1])


# Batches go out as executemany of one cached single-row statement, which SQLAlchemy sends as
# multi-row INSERTs ("insertmanyvalues") without compiling anything per batch. Chunks of these
# sizes (largest first) keep the distinct SQL strings a connection sees, and so its prepared
# statements, to a handful instead of one per batch size.
_CHUNKS = (64, 16, 4, 1)


def _chunks(rows: Sequence[dict[str, Any]]) -> list[Sequence[dict[str, Any]]]:
    out = []
    start = 0
    while start < len(rows):
        size = next(n for n in _CHUNKS if n <= len(rows) - start)
        out.append(rows[start : start + size])
        start += size
    return out


@functools.cache
def _insert_events_stmt(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = cast(Table, InboxEvent.__table__)
    return (
        insert(table)
        .on_conflict_do_nothing(index_elements=["source_id", "dedup_key"])
        .returning(table.c.id)
    )


@functools.cache
def _insert_stmt(table: Any) -> Any:
    return sa_insert(table)


async def insert_events(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> list[str]:
    """INSERT … ON CONFLICT (source_id, dedup_key) DO NOTHING RETURNING id: the inserted ids.

    Concurrent deliveries of one event race here, and the unique index decides: exactly one
    inserts, the others wait for it to commit and then insert nothing.
    """
    connection = await session.connection()
    stmt = _insert_events_stmt(connection.dialect.name)
    ids: list[str] = []
    for chunk in _chunks(rows):
        ids.extend((await connection.execute(stmt, list(chunk))).scalars())
    return ids


async def insert_rows(
    session: AsyncSession, table: type[Base], rows: Sequence[dict[str, Any]]
) -> None:
    """Plain inserts of many rows (new jobs, their outbox rows)."""
    if not rows:
        return
    connection = await session.connection()
    stmt = _insert_stmt(table.__table__)
    for chunk in _chunks(rows):
        await connection.execute(stmt, list(chunk))


# PostgreSQL: a batch of deliveries in one statement, so one round trip and one implicit
# transaction (atomic like any single statement). The batch comes as one array per column;
# the new events' job rows and outbox messages are inserted for exactly the events the first
# INSERT inserted (RETURNING), so a key that already existed gets neither. The foreign keys of the
# job rows are checked at the end of the statement, when the events are there.
_STORE_EVENTS_PG = """
WITH batch AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[],
        $8::int[], $9::text[], $10::text[], $11::timestamptz[], $12::int[], $13::text[],
        $14::int[], $15::text[]
    ) AS t(id, tenant_id, source_id, dedup_key, type, subject, body, size, sha256, headers,
           received_at, duplicate_count, job_id, max_attempts, outbox_id)
), inserted AS (
    INSERT INTO ingest_events (id, tenant_id, source_id, dedup_key, type, subject, body, size,
                               sha256, headers, received_at, duplicate_count)
    SELECT id, tenant_id, source_id, dedup_key, type, subject, body, size, sha256,
           headers::json, received_at, duplicate_count
    FROM batch
    ON CONFLICT (source_id, dedup_key) DO NOTHING
    RETURNING id
), jobs AS (
    INSERT INTO ingest_jobs (id, tenant_id, source_id, event_id, status, attempts, max_attempts,
                             next_attempt_at, locked_until, last_error, created_at, updated_at,
                             finished_at)
    SELECT b.job_id, b.tenant_id, b.source_id, b.id, 'queued', 0, b.max_attempts,
           b.received_at, NULL, NULL, b.received_at, b.received_at, NULL
    FROM batch b JOIN inserted USING (id)
), messages AS (
    -- One message per tenant announcing all of its new jobs of the batch (see `inbox`).
    INSERT INTO outbox (id, tenant_id, topic, message_id, payload, headers, created_at,
                        available_at, attempts, last_error, sent_at)
    SELECT min(b.outbox_id), b.tenant_id, $16::text, min(b.job_id),
           convert_to(string_agg(b.job_id, ' ' ORDER BY b.job_id), 'UTF8'), '{}'::json,
           min(b.received_at), min(b.received_at), 0, NULL, NULL
    FROM batch b JOIN inserted USING (id)
    GROUP BY b.tenant_id
)
SELECT id FROM inserted
"""

_COUNT_DUPLICATES_PG = """
UPDATE ingest_events SET duplicate_count = duplicate_count + $3
WHERE source_id = $1 AND dedup_key = $2
RETURNING id
"""


async def store_events_pg(
    connection: Any,
    rows: Sequence[dict[str, Any]],
    max_attempts: Sequence[int],
    job_ids: Sequence[str],
    outbox_ids: Sequence[str],
    topic: str,
) -> list[str]:
    """Insert inbox rows (ON CONFLICT (source_id, dedup_key) DO NOTHING), a job for each one
    inserted and an outbox message per tenant naming those jobs, in one statement on a raw
    asyncpg `connection` outside any transaction; returns the inserted ids. `rows` must be in
    key order (lock order)."""
    records = await connection.fetch(
        _STORE_EVENTS_PG,
        [r["id"] for r in rows],
        [r["tenant_id"] for r in rows],
        [r["source_id"] for r in rows],
        [r["dedup_key"] for r in rows],
        [r["type"] for r in rows],
        [r["subject"] for r in rows],
        [r["body"] for r in rows],
        [r["size"] for r in rows],
        [r["sha256"] for r in rows],
        [orjson.dumps(r["headers"]).decode() for r in rows],
        [r["received_at"] for r in rows],
        [r["duplicate_count"] for r in rows],
        job_ids,
        max_attempts,
        outbox_ids,
        topic,
    )
    return [record[0] for record in records]


async def count_duplicates_pg(
    connection: Any, source_id: str, dedup_key: str, count: int
) -> str | None:
    """`count_duplicates` on a raw asyncpg connection, as its own (atomic) statement."""
    value = await connection.fetchval(_COUNT_DUPLICATES_PG, source_id, dedup_key, count)
    return None if value is None else str(value)


async def count_duplicates(
    session: AsyncSession, source_id: str, dedup_key: str, count: int
) -> str | None:
    """Add `count` to the original's duplicate_count in the database (atomic); its id, if it
    exists."""
    result = await session.execute(
        update(InboxEvent)
        .where(InboxEvent.source_id == source_id, InboxEvent.dedup_key == dedup_key)
        .values(duplicate_count=InboxEvent.duplicate_count + count)
        .returning(InboxEvent.id)
        .execution_options(synchronize_session=False)
    )
    return result.scalar_one_or_none()


async def prune_rejections(
    session: AsyncSession, source_id: str, *, keep: int, older_than: dt.datetime
) -> None:
    """Keep the newest `keep` rejections of a source and none older than `older_than`."""
    newest_kept = (
        select(Rejection.id)
        .where(Rejection.source_id == source_id)
        .order_by(Rejection.id.desc())
        .offset(keep - 1)
        .limit(1)
        .scalar_subquery()
    )
    # With fewer than `keep` rows the subquery is NULL and `id < NULL` deletes nothing.
    await session.execute(
        delete(Rejection)
        .where(
            Rejection.source_id == source_id,
            or_(Rejection.received_at < older_than, Rejection.id < newest_kept),
        )
        .execution_options(synchronize_session=False)
    )


async def delete_source_rows(session: AsyncSession, source_id: str) -> None:
    """Remove a source with its jobs, events and rejections (children first, for the FKs)."""
    for model in (Job, InboxEvent, Rejection):
        await session.execute(
            delete(model)
            .where(model.source_id == source_id)
            .execution_options(synchronize_session=False)
        )
    await session.execute(
        delete(Source).where(Source.id == source_id).execution_options(synchronize_session=False)
    )


# --- jobs -------------------------------------------------------------------------------------


def _lease_expired(now: dt.datetime) -> Any:
    return and_(Job.status == "running", Job.locked_until < now)


def _dispatchable(now: dt.datetime, stuck_before: dt.datetime) -> Any:
    # `next_attempt_at` is the retry's time, the lease's end, or when the job was queued: one
    # index on (status, next_attempt_at) serves all three scans.
    return or_(
        and_(Job.status == "retrying", Job.next_attempt_at <= now),
        and_(Job.status == "running", Job.next_attempt_at < now),
        and_(Job.status == "queued", Job.next_attempt_at < stuck_before),
    )


async def dispatchable(
    session: AsyncSession, *, now: dt.datetime, stuck_before: dt.datetime, limit: int
) -> list[str]:
    """Ids of jobs the broker should carry again: due retries, expired leases, and queued jobs
    whose message has not been taken for a long while (lost with an in-process broker)."""
    stmt = (
        select(Job.id)
        .where(_dispatchable(now, stuck_before))
        .order_by(Job.next_attempt_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)  # several workers' schedulers share
    return list((await session.execute(stmt)).scalars())


async def bury_exhausted(session: AsyncSession, ids: Sequence[str], *, now: dt.datetime) -> int:
    """Dead-letter jobs whose lease expired on their last attempt; how many."""
    result = await session.execute(
        update(Job)
        .where(Job.id.in_(ids), _lease_expired(now), Job.attempts >= Job.max_attempts)
        .values(
            status="dead",
            locked_until=None,
            next_attempt_at=now,
            finished_at=now,
            updated_at=now,
            last_error="the worker running the last attempt stopped (lease expired)",
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return len(result.all())


async def requeue(
    session: AsyncSession, ids: Sequence[str], *, now: dt.datetime, stuck_before: dt.datetime
) -> list[tuple[str, str]]:
    """Move dispatchable jobs back to queued; (id, tenant_id) of those this call moved."""
    result = await session.execute(
        update(Job)
        .where(
            Job.id.in_(ids),
            _dispatchable(now, stuck_before),
            or_(Job.status != "running", Job.attempts < Job.max_attempts),
        )
        .values(status="queued", locked_until=None, next_attempt_at=now, updated_at=now)
        .returning(Job.id, Job.tenant_id)
        .execution_options(synchronize_session=False)
    )
    return [(row[0], row[1]) for row in result.all()]


async def rerun_jobs(
    session: AsyncSession,
    *,
    tenant_id: str,
    now: dt.datetime,
    max_attempts: int,
    job_id: str | None = None,
    source_id: str | None = None,
    since: dt.datetime | None = None,
) -> list[str]:
    """Send finished jobs (succeeded or dead) round again with a fresh attempt budget."""
    stmt = update(Job).where(Job.tenant_id == tenant_id, Job.status.in_(RERUNNABLE))
    if job_id is not None:
        stmt = stmt.where(Job.id == job_id)
    if source_id is not None:
        stmt = stmt.where(Job.source_id == source_id)
    if since is not None:
        events = select(InboxEvent.id).where(
            InboxEvent.tenant_id == tenant_id, InboxEvent.received_at >= since
        )
        if source_id is not None:
            events = events.where(InboxEvent.source_id == source_id)
        stmt = stmt.where(Job.event_id.in_(events))
    result = await session.execute(
        stmt.values(
            status="queued",
            attempts=0,
            max_attempts=max_attempts,
            next_attempt_at=now,
            locked_until=None,
            last_error=None,
            finished_at=None,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return list(result.scalars())
