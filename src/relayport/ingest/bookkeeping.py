"""Job state changes of concurrently running jobs, grouped into shared transactions.

A worker runs many jobs at once (its consumer's prefetch). Each claims its job (and reads the
event) before the handler runs and records the outcome after; alone, that is two write
transactions per job, which on the embedded default compete with intake for SQLite's one
write lock. Here the claims of concurrent jobs share one transaction (one guarded UPDATE plus
one read of their events), and so do their outcomes (one UPDATE for all the successes), through
`GroupCommit`. The guarantees are the single-job ones: a claim is still a guarded UPDATE that
only one worker can win, an outcome is still recorded only while its attempt holds the job, and
nothing is committed on behalf of a job before its own claim or outcome is known.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.db import Database, utcnow
from relayport.core.groupcommit import GroupCommit, sqlite_write_lock
from relayport.core.platform import Platform
from relayport.ingest import job_repository as repository
from relayport.ingest.batcher import freeze_startup_objects, raw_connection
from relayport.ingest.job_repository import EventToRun

_CLAIMS_KEY = "ingest.job_claims"
_OUTCOMES_KEY = "ingest.job_outcomes"
_PG_CONCURRENCY = 2


@dataclass(frozen=True, slots=True)
class Claim:
    """One attempt of a job, now ours to run until `lease_until`."""

    job_id: str
    attempt: int
    max_attempts: int
    event: EventToRun


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended; `values` are the job's new column values."""

    job_id: str
    attempt: int
    status: Literal["succeeded", "retrying", "dead"]
    values: dict[str, Any]


def claims(platform: Platform) -> GroupCommit[str, Claim | None]:
    """The process's group committer of job claims: job id in, its `Claim` or None out."""
    committer = platform.extras.get(_CLAIMS_KEY)
    if committer is None:
        lease_s = platform.settings.ingest.lease_s

        async def write(session: AsyncSession, job_ids: Sequence[str]) -> list[Claim | None]:
            return await _claim(session, job_ids, lease_s)

        async def run_pg(job_ids: Sequence[str]) -> list[Claim | None]:
            return await _claim_pg(platform.db, job_ids, lease_s)

        committer = platform.extras[_CLAIMS_KEY] = _committer(platform, write, "claims", run_pg)
    assert isinstance(committer, GroupCommit)
    return committer


def outcomes(platform: Platform) -> GroupCommit[Outcome, bool]:
    """The process's group committer of attempt outcomes: True when the outcome was recorded,
    False when the attempt no longer held its job (its lease ran out and another took it)."""
    committer = platform.extras.get(_OUTCOMES_KEY)
    if committer is None:

        async def run_pg(items: Sequence[Outcome]) -> list[bool]:
            return await _finish_pg(platform.db, items)

        committer = platform.extras[_OUTCOMES_KEY] = _committer(
            platform, _finish, "outcomes", run_pg
        )
    assert isinstance(committer, GroupCommit)
    return committer


def _committer(platform: Platform, write: Any, name: str, run_pg: Any) -> GroupCommit[Any, Any]:
    freeze_startup_objects(platform)
    settings = platform.settings.ingest
    sqlite = platform.db.dialect == "sqlite"
    pg = platform.db.dialect == "postgresql"
    return GroupCommit(
        platform.db,
        None if pg else write,
        run=run_pg if pg else None,
        name=name,
        max_items=settings.batch_max_rows,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        concurrency=1 if sqlite else _PG_CONCURRENCY,
        lock=sqlite_write_lock(platform),
    )


async def _claim(
    session: AsyncSession, job_ids: Sequence[str], lease_s: float
) -> list[Claim | None]:
    now = utcnow()
    lease_until = now + dt.timedelta(seconds=lease_s)
    claimed = await repository.claim_jobs(session, job_ids, now=now, lease_until=lease_until)
    found = await repository.events_to_run(session, [c[0] for c in claimed.values()])
    results: list[Claim | None] = []
    for job_id in job_ids:
        # The same job twice in one batch (a redelivered message): only the first runs it.
        got = claimed.pop(job_id, None)
        event = found.get(got[0]) if got is not None else None
        if got is None or event is None:  # not ours, or deleted with its source meanwhile
            results.append(None)
            continue
        results.append(Claim(job_id, got[1], got[2], event))
    return results


async def _claim_pg(db: Database, job_ids: Sequence[str], lease_s: float) -> list[Claim | None]:
    # PostgreSQL: the guarded claim and the read of the events are one statement, atomic on
    # its own (one round trip, no BEGIN/COMMIT), on the pool's raw connection.
    now = utcnow()
    lease_until = now + dt.timedelta(seconds=lease_s)
    async with raw_connection(db) as connection:
        claimed = await repository.claim_jobs_pg(
            connection, job_ids, now=now, lease_until=lease_until
        )
    results: list[Claim | None] = []
    for job_id in job_ids:
        got = claimed.pop(job_id, None)  # the same job twice in one batch: only the first
        results.append(None if got is None else Claim(job_id, got[0], got[1], got[2]))
    return results


async def _finish_pg(db: Database, items: Sequence[Outcome]) -> list[bool]:
    # PostgreSQL: the successes in one statement on the raw connection; the (rarer) failures,
    # each with its own values, in one transaction after it. Each outcome stands on its own,
    # so they need not share a transaction.
    done = utcnow()
    succeeded = [(o.job_id, o.attempt) for o in items if o.status == "succeeded"]
    recorded: set[str] = set()
    if succeeded:
        async with raw_connection(db) as connection:
            recorded = await repository.finish_succeeded_pg(connection, succeeded, done=done)
    failed = [o for o in items if o.status != "succeeded"]
    kept: dict[int, bool] = {}
    if failed:
        async with db.transaction() as session:
            for outcome in failed:
                kept[id(outcome)] = await repository.finish_job(
                    session, outcome.job_id, attempt=outcome.attempt, values=outcome.values
                )
    return [o.job_id in recorded if o.status == "succeeded" else kept[id(o)] for o in items]


async def _finish(session: AsyncSession, items: Sequence[Outcome]) -> list[bool]:
    # Successes share their values (no error text, the batch's time), so one UPDATE records
    # them all; failures carry their own error and retry time.
    done = utcnow()
    succeeded = [(o.job_id, o.attempt) for o in items if o.status == "succeeded"]
    recorded = await repository.finish_succeeded(session, succeeded, done=done)
    results: list[bool] = []
    for outcome in items:
        if outcome.status == "succeeded":
            results.append(outcome.job_id in recorded)
            continue
        results.append(
            await repository.finish_job(
                session, outcome.job_id, attempt=outcome.attempt, values=outcome.values
            )
        )
    return results
