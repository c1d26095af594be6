"""Storing accepted deliveries, many requests per transaction (group commit).

Each verified delivery becomes a `NewEvent`; the process's one `inbox_writer` gathers the
events of concurrent requests and stores them together: multi-row inserts of inbox rows
(`ON CONFLICT (source_id, dedup_key) DO NOTHING RETURNING id`), then of the new events' jobs and
of one outbox message per tenant whose body lists that tenant's new job ids (so the relay, the
broker and the worker handle one message per batch, not one per delivery), then one atomic
`duplicate_count` update per event that already existed, all in one transaction. On PostgreSQL
the inserts are one statement (`store_events_pg`: one round trip, atomic on its own) and each
`duplicate_count` update its own statement after it. A request answers only after what stores
its delivery committed.

Exactly one job per event still holds:
- copies of one event inside a batch are grouped first: one row is inserted, with
  `duplicate_count` already counting the others, and they answer as its duplicates;
- across batches (and processes) the unique index decides, as with one request per
  transaction: PostgreSQL makes a second insert of the same key wait for the first's commit and
  then skip it; SQLite has one writer at a time.
Rows are inserted and updated in key order, so two concurrent batches take their locks in the
same order and cannot deadlock each other.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.db import Database
from relayport.core.errors import Conflict
from relayport.core.groupcommit import GroupCommit, sqlite_write_lock
from relayport.core.ids import new_id
from relayport.core.outbox import OutboxMessage, outbox_values
from relayport.core.platform import Platform
from relayport.ingest import repository
from relayport.ingest.batcher import freeze_startup_objects, raw_connection
from relayport.ingest.models import Job
from relayport.ingest.service import QUEUE

_WRITER_KEY = "ingest.inbox_writer"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A verified delivery to store: its inbox row's values and its source's attempt budget."""

    row: dict[str, Any]
    max_attempts: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.row["source_id"], self.row["dedup_key"])


@dataclass(frozen=True, slots=True)
class Stored:
    status: Literal["accepted", "duplicate"]
    event_id: str


def inbox_writer(platform: Platform) -> GroupCommit[NewEvent, Stored]:
    """The process's group committer for accepted deliveries (made on first use)."""
    writer = platform.extras.get(_WRITER_KEY)
    if writer is None:
        freeze_startup_objects(platform)
        settings = platform.settings.ingest
        db = platform.db
        pg = db.dialect == "postgresql"

        async def run_pg(items: Sequence[NewEvent]) -> list[Stored | Exception]:
            return await store_events_pg(db, items)

        writer = platform.extras[_WRITER_KEY] = GroupCommit(
            db,
            None if pg else write_events,
            run=run_pg if pg else None,
            name="inbox",
            max_items=settings.batch_max_rows,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            # SQLite has one writer: concurrent batches would only wait on its lock.
            concurrency=1 if platform.db.dialect == "sqlite" else settings.batch_concurrency,
            lock=sqlite_write_lock(platform),
        )
    assert isinstance(writer, GroupCommit)
    return writer


Groups = dict[tuple[str, str], list[int]]


def _group(items: Sequence[NewEvent]) -> tuple[Groups, list[tuple[str, str]], list[dict[str, Any]]]:
    """Copies of one event grouped (item indexes by key), the keys in lock order, and one row
    per key whose `duplicate_count` already counts the other copies."""
    groups: Groups = {}
    for index, item in enumerate(items):
        groups.setdefault(item.key, []).append(index)
    keys = sorted(groups)
    candidates = []
    for key in keys:
        indexes = groups[key]
        row = items[indexes[0]].row
        # A copy only for copies of one event: an item is written again alone if its batch
        # fails, so its own row must keep the count it came with (0).
        candidates.append(
            row if len(indexes) == 1 else {**row, "duplicate_count": len(indexes) - 1}
        )
    return groups, keys, candidates


def _duplicate_results(
    results: list[Stored | Exception | None], indexes: list[int], original: str | None
) -> None:
    for index in indexes:
        results[index] = (
            Stored("duplicate", original)
            if original is not None
            # Deleted between the INSERT and the UPDATE: only a source deletion does that.
            else Conflict("the source changed while this delivery was stored; send it again")
        )


def _finished(results: list[Stored | Exception | None]) -> list[Stored | Exception]:
    return [r if r is not None else RuntimeError("delivery left unstored") for r in results]


async def store_events_pg(db: Database, items: Sequence[NewEvent]) -> list[Stored | Exception]:
    """PostgreSQL: store a batch of deliveries in one statement (inbox rows, and the new ones'
    jobs and outbox rows), then count the copies of events stored earlier; one result per item.

    One round trip and one implicit transaction per batch, on the pool's raw asyncpg connection:
    SQLAlchemy's statement compilation, parameter processing and the BEGIN/COMMIT round trips
    cost the API process more CPU than the rest of the ingest path.
    """
    groups, keys, candidates = _group(items)
    async with raw_connection(db) as raw:
        return await _store_pg(raw, items, groups, keys, candidates)


def _outbox_ids(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's outbox message id: one message per tenant (the statement takes the least)."""
    ids: dict[str, str] = {}
    return [ids.get(r["tenant_id"]) or ids.setdefault(r["tenant_id"], new_id("obx")) for r in rows]


async def _store_pg(
    raw: Any,
    items: Sequence[NewEvent],
    groups: Groups,
    keys: list[tuple[str, str]],
    candidates: list[dict[str, Any]],
) -> list[Stored | Exception]:
    inserted = set(
        await repository.store_events_pg(
            raw,
            candidates,
            [items[groups[key][0]].max_attempts for key in keys],
            [new_id("job") for _ in keys],
            _outbox_ids(candidates),
            QUEUE,
        )
    )
    results: list[Stored | Exception | None] = [None] * len(items)
    for key, row in zip(keys, candidates, strict=True):
        indexes = groups[key]
        if row["id"] in inserted:
            results[indexes[0]] = Stored("accepted", row["id"])
            for index in indexes[1:]:
                results[index] = Stored("duplicate", row["id"])
            continue
        original = await repository.count_duplicates_pg(raw, *key, len(indexes))
        _duplicate_results(results, indexes, original)
    return _finished(results)


async def write_events(
    session: AsyncSession, items: Sequence[NewEvent]
) -> list[Stored | Exception]:
    """Store a batch of deliveries in the caller's transaction; one result per item."""
    groups, keys, candidates = _group(items)
    inserted = set(await repository.insert_events(session, candidates))
    jobs: list[dict[str, Any]] = []
    results: list[Stored | Exception | None] = [None] * len(items)
    existing: list[tuple[str, str]] = []
    for key, row in zip(keys, candidates, strict=True):
        indexes = groups[key]
        if row["id"] not in inserted:
            existing.append(key)
            continue
        job_id = new_id("job")
        created = row["received_at"]
        jobs.append(_job_values(job_id, row, items[indexes[0]].max_attempts, created))
        results[indexes[0]] = Stored("accepted", row["id"])
        for index in indexes[1:]:
            results[index] = Stored("duplicate", row["id"])
    await repository.insert_rows(session, Job, jobs)
    await repository.insert_rows(session, OutboxMessage, _messages(jobs))
    for key in existing:
        original = await repository.count_duplicates(session, *key, len(groups[key]))
        _duplicate_results(results, groups[key], original)
    return _finished(results)


def _messages(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One outbox message per tenant naming its new jobs (space-separated ids, sorted), as
    `repository.store_events_pg` builds them on PostgreSQL."""
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        by_tenant.setdefault(job["tenant_id"], []).append(job)
    messages = []
    for tenant_id, own in by_tenant.items():
        ids = sorted(job["id"] for job in own)
        messages.append(
            outbox_values(
                topic=QUEUE,
                payload=" ".join(ids).encode(),
                message_id=ids[0],
                tenant_id=tenant_id,
                now=min(job["created_at"] for job in own),
            )
        )
    return messages


def _job_values(
    job_id: str, event: dict[str, Any], max_attempts: int, now: dt.datetime
) -> dict[str, Any]:
    return {
        "id": job_id,
        "tenant_id": event["tenant_id"],
        "source_id": event["source_id"],
        "event_id": event["id"],
        "status": "queued",
        "attempts": 0,
        "max_attempts": max_attempts,
        "next_attempt_at": now,
        "locked_until": None,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
    }
