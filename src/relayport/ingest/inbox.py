"""Storing accepted deliveries, many requests per transaction (group commit).

Each verified delivery becomes a `NewEvent`; the process's one `inbox_writer` gathers the
events of concurrent requests and stores them together: multi-row inserts of inbox rows
(`ON CONFLICT (source_id, dedup_key) DO NOTHING RETURNING id`), then of the new events' jobs and
outbox rows, then one atomic `duplicate_count` update per event that already existed, all in
one transaction. A request answers only after that transaction committed.

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

from relayport.core.errors import Conflict
from relayport.core.ids import new_id
from relayport.core.outbox import OutboxMessage, outbox_values
from relayport.core.platform import Platform
from relayport.ingest import repository
from relayport.ingest.batcher import GroupCommit, sqlite_write_lock
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
        settings = platform.settings.ingest
        writer = platform.extras[_WRITER_KEY] = GroupCommit(
            platform.db,
            write_events,
            name="inbox",
            max_items=settings.batch_max_rows,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            # SQLite has one writer: concurrent batches would only wait on its lock.
            concurrency=1 if platform.db.dialect == "sqlite" else settings.batch_concurrency,
            lock=sqlite_write_lock(platform),
        )
    assert isinstance(writer, GroupCommit)
    return writer


async def write_events(
    session: AsyncSession, items: Sequence[NewEvent]
) -> list[Stored | Exception]:
    """Store a batch of deliveries in the caller's transaction; one result per item."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.key, []).append(index)
    keys = sorted(groups)
    candidates = [
        {**items[groups[key][0]].row, "duplicate_count": len(groups[key]) - 1} for key in keys
    ]
    inserted = set(await repository.insert_events(session, candidates))
    jobs: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
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
        messages.append(
            outbox_values(
                topic=QUEUE,
                payload=job_id.encode(),
                message_id=job_id,
                tenant_id=row["tenant_id"],
                now=created,
            )
        )
        results[indexes[0]] = Stored("accepted", row["id"])
        for index in indexes[1:]:
            results[index] = Stored("duplicate", row["id"])
    await repository.insert_rows(session, Job, jobs)
    await repository.insert_rows(session, OutboxMessage, messages)
    for key in existing:
        original = await repository.count_duplicates(session, *key, len(groups[key]))
        for index in groups[key]:
            results[index] = (
                Stored("duplicate", original)
                if original is not None
                # Deleted between the INSERT and the UPDATE: only a source deletion does that.
                else Conflict("the source changed while this delivery was stored; send it again")
            )
    return [r if r is not None else RuntimeError("delivery left unstored") for r in results]


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
