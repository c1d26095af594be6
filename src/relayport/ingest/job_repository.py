"""The worker's hot statements: claiming jobs, reading their events, recording outcomes.

They run for every job, so they are built once, as Core statements with bound parameters
(lists expand at execution), and executed on the session's connection: no ORM unit of work and
no statement construction or cache-key computation per call.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.db import UTCDateTime
from relayport.ingest.models import InboxEvent, Job, Source

_jobs = cast(Table, Job.__table__)
_events = cast(Table, InboxEvent.__table__)
_sources = cast(Table, Source.__table__)

# While running, `next_attempt_at` is the lease's end, so the scheduler finds expired leases
# through the same index as due retries.
_CLAIM = (
    update(_jobs)
    .where(
        _jobs.c.id.in_(bindparam("job_ids", expanding=True)),
        _jobs.c.status.in_(("queued", "retrying")),
        _jobs.c.next_attempt_at <= bindparam("now_", type_=UTCDateTime()),
        or_(
            _jobs.c.locked_until.is_(None),
            _jobs.c.locked_until < bindparam("now_", type_=UTCDateTime()),
        ),
        _jobs.c.attempts < _jobs.c.max_attempts,
    )
    .values(
        status="running",
        attempts=_jobs.c.attempts + 1,
        locked_until=bindparam("lease_until", type_=UTCDateTime()),
        next_attempt_at=bindparam("lease_until", type_=UTCDateTime()),
        updated_at=bindparam("now_", type_=UTCDateTime()),
    )
    .returning(_jobs.c.id, _jobs.c.event_id, _jobs.c.attempts, _jobs.c.max_attempts)
)

_EVENTS = (
    select(
        _events.c.id,
        _events.c.source_id,
        _events.c.type,
        _events.c.subject,
        _events.c.body,
        _events.c.headers,
        _events.c.received_at,
        _sources.c.handler,
    )
    .join(_sources, _sources.c.id == _events.c.source_id)
    .where(_events.c.id.in_(bindparam("event_ids", expanding=True)))
)

_SUCCEEDED = (
    update(_jobs)
    .where(
        tuple_(_jobs.c.id, _jobs.c.attempts).in_(bindparam("attempts_", expanding=True)),
        _jobs.c.status == "running",
    )
    .values(
        status="succeeded",
        locked_until=None,
        last_error=None,
        updated_at=bindparam("done", type_=UTCDateTime()),
        next_attempt_at=bindparam("done", type_=UTCDateTime()),
        finished_at=bindparam("done", type_=UTCDateTime()),
    )
    .returning(_jobs.c.id)
)


@dataclass(frozen=True, slots=True)
class EventToRun:
    """What a handler run needs of an inbox event (the columns `service.cloudevent` reads)."""

    id: str
    source_id: str
    type: str
    subject: str | None
    body: bytes
    headers: dict[str, str]
    received_at: dt.datetime
    handler: str


async def claim_jobs(
    session: AsyncSession, job_ids: Sequence[str], *, now: dt.datetime, lease_until: dt.datetime
) -> dict[str, tuple[str, int, int]]:
    """Take due jobs for one attempt each: {job id: (event_id, attempt number, max attempts)}
    for those that were ours to run.

    One guarded UPDATE, so two workers handed the same message cannot both win: the loser's
    WHERE no longer matches once the winner's change is visible (PostgreSQL re-checks it after
    waiting on the row lock; SQLite has one writer at a time).
    """
    connection = await session.connection()
    result = await connection.execute(
        _CLAIM, {"job_ids": sorted(set(job_ids)), "now_": now, "lease_until": lease_until}
    )
    return {row[0]: (row[1], row[2], row[3]) for row in result.all()}


async def events_to_run(session: AsyncSession, event_ids: Sequence[str]) -> dict[str, EventToRun]:
    """Events by id with their source's handler (those still there: deleting a source removes
    its events)."""
    if not event_ids:
        return {}
    connection = await session.connection()
    rows = await connection.execute(_EVENTS, {"event_ids": sorted(set(event_ids))})
    return {row[0]: EventToRun(*row) for row in rows.all()}


async def finish_succeeded(
    session: AsyncSession, attempts: Sequence[tuple[str, int]], *, done: dt.datetime
) -> set[str]:
    """Record success for (job id, attempt) pairs whose attempt still holds its job."""
    if not attempts:
        return set()
    connection = await session.connection()
    result = await connection.execute(_SUCCEEDED, {"attempts_": sorted(attempts), "done": done})
    return set(result.scalars())


async def finish_job(
    session: AsyncSession, job_id: str, *, attempt: int, values: dict[str, Any]
) -> bool:
    """Record a failed attempt's outcome unless the job moved on without us (lease lost)."""
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
        .values(**values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


# --- PostgreSQL: the same statements on a raw asyncpg connection, each atomic on its own ------

# The claim and the read of the claimed jobs' events in one statement (the UPDATE's guard is
# `_CLAIM`'s); a claimed job whose event is gone comes back without its row, as from
# `events_to_run`.
_CLAIM_PG = """
WITH claimed AS (
    UPDATE ingest_jobs
    SET status = 'running', attempts = attempts + 1, locked_until = $3, next_attempt_at = $3,
        updated_at = $2
    WHERE id = ANY($1::text[]) AND status IN ('queued', 'retrying') AND next_attempt_at <= $2
      AND (locked_until IS NULL OR locked_until < $2) AND attempts < max_attempts
    RETURNING id, event_id, attempts, max_attempts
)
SELECT c.id, c.attempts, c.max_attempts, e.id, e.source_id, e.type, e.subject, e.body,
       e.headers, e.received_at, s.handler
FROM claimed c
JOIN ingest_events e ON e.id = c.event_id
JOIN ingest_sources s ON s.id = e.source_id
"""

_SUCCEEDED_PG = """
UPDATE ingest_jobs AS j
SET status = 'succeeded', locked_until = NULL, last_error = NULL, updated_at = $3,
    next_attempt_at = $3, finished_at = $3
FROM unnest($1::text[], $2::int[]) AS a(id, attempts)
WHERE j.id = a.id AND j.attempts = a.attempts AND j.status = 'running'
RETURNING j.id
"""


async def claim_jobs_pg(
    connection: Any, job_ids: Sequence[str], *, now: dt.datetime, lease_until: dt.datetime
) -> dict[str, tuple[int, int, EventToRun]]:
    """`claim_jobs` and `events_to_run` in one statement on a raw asyncpg connection:
    {job id: (attempt number, max attempts, its event)} for the jobs that were ours to run."""
    rows = await connection.fetch(_CLAIM_PG, sorted(set(job_ids)), now, lease_until)
    return {row[0]: (row[1], row[2], EventToRun(*row[3:])) for row in rows}


async def finish_succeeded_pg(
    connection: Any, attempts: Sequence[tuple[str, int]], *, done: dt.datetime
) -> set[str]:
    """`finish_succeeded` on a raw asyncpg connection."""
    if not attempts:
        return set()
    ordered = sorted(attempts)
    rows = await connection.fetch(
        _SUCCEEDED_PG, [a[0] for a in ordered], [a[1] for a in ordered], done
    )
    return {row[0] for row in rows}
