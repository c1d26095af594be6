"""Group commit: `GroupCommit` itself (batching, failure isolation, cancellation), the inbox's
batch write (duplicates inside one batch and across batches), and what a request sees when its
batch cannot be stored.

The batching tests control when a batch may finish with events, never with timing: a batch's
write blocks until the test releases it, so what arrives meanwhile must form the next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core import gcpolicy
from relayport.core.broker import Message
from relayport.core.db import Database, utcnow
from relayport.core.errors import Conflict
from relayport.core.groupcommit import GroupCommit
from relayport.core.ids import new_id
from relayport.core.outbox import OutboxMessage
from relayport.core.platform import Platform
from relayport.ingest import batcher, bookkeeping, repository
from relayport.ingest import worker as ingest_worker
from relayport.ingest.inbox import NewEvent, Stored, inbox_writer, store_events_pg, write_events
from relayport.ingest.models import InboxEvent, Job
from tests.conftest import Account, signup
from tests.core.test_auth import assert_problem
from tests.ingest.conftest import create_source, deliver, eventually


class Gate:
    """A batch writer that records its batches and holds each until released."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()
        self.fail_on = fail_on

    async def write(self, session: AsyncSession, items: Sequence[str]) -> list[str | Exception]:
        self.batches.append(list(items))
        self.entered.set()
        await self.release.wait()
        if self.fail_on in items:
            raise OperationalError("INSERT", {}, Exception("poisoned row"))
        return [item.upper() if item != "conflict" else Conflict("no") for item in items]


def committer(
    db: Database, gate: Gate, *, max_items: int = 100, max_wait_s: float = 0.0
) -> GroupCommit[str, str]:
    return GroupCommit(
        db, gate.write, name="test", max_items=max_items, max_wait_s=max_wait_s, concurrency=1
    )


async def test_items_arriving_during_a_write_form_the_next_batch(platform: Platform) -> None:
    gate = Gate()
    gate.release.clear()
    group = committer(platform.db, gate)
    first = asyncio.create_task(group.submit("a"))
    await gate.entered.wait()
    rest = [asyncio.create_task(group.submit(x)) for x in ("b", "c", "d")]
    await asyncio.sleep(0)  # let them queue behind the write in flight
    gate.release.set()
    assert await first == "A"
    assert [await t for t in rest] == ["B", "C", "D"]
    assert gate.batches == [["a"], ["b", "c", "d"]]
    assert (group.batches, group.items) == (2, 4)


async def test_batches_are_bounded_by_max_items(platform: Platform) -> None:
    gate = Gate()
    gate.release.clear()
    group = committer(platform.db, gate, max_items=2)
    first = asyncio.create_task(group.submit("a"))
    await gate.entered.wait()
    tasks = [asyncio.create_task(group.submit(x)) for x in "bcdef"]
    await asyncio.sleep(0)
    gate.release.set()
    assert [await t for t in [first, *tasks]] == list("ABCDEF")
    assert gate.batches == [["a"], ["b", "c"], ["d", "e"], ["f"]]


async def test_a_lone_item_is_written_once_its_wait_is_over(platform: Platform) -> None:
    # max_items far away and a wait: only the timer can start this batch.
    group = committer(platform.db, Gate(), max_items=1000, max_wait_s=0.002)
    assert await asyncio.wait_for(group.submit("x"), 10) == "X"


async def test_a_failed_batch_fails_only_the_item_that_still_fails_alone(
    platform: Platform,
) -> None:
    gate = Gate(fail_on="bad")
    gate.release.clear()
    group = committer(platform.db, gate)
    first = asyncio.create_task(group.submit("a"))
    await gate.entered.wait()
    batch = [asyncio.create_task(group.submit(x)) for x in ("b", "bad", "c", "conflict")]
    await asyncio.sleep(0)
    gate.release.set()
    assert await first == "A"
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert results[0] == "B"
    assert isinstance(results[1], OperationalError)
    assert results[2] == "C"
    assert isinstance(results[3], Conflict)  # a per-item answer, not a batch failure
    # The batch of four failed, then each was written alone.
    assert gate.batches[1:] == [["b", "bad", "c", "conflict"], ["b"], ["bad"], ["c"], ["conflict"]]


async def test_a_caller_giving_up_does_not_cancel_its_batch(platform: Platform) -> None:
    gate = Gate()
    gate.release.clear()
    group = committer(platform.db, gate)
    first = asyncio.create_task(group.submit("a"))
    await gate.entered.wait()
    quitter = asyncio.create_task(group.submit("b"))
    stayer = asyncio.create_task(group.submit("c"))
    await asyncio.sleep(0)
    quitter.cancel()
    gate.release.set()
    assert await first == "A"
    assert await stayer == "C"
    assert quitter.cancelled()
    assert gate.batches == [["a"], ["b", "c"]]  # b was still written with its batch


# --- the inbox's batch write ------------------------------------------------------------------


def _event(source: dict[str, Any], account: Account, key: str) -> NewEvent:
    return NewEvent(
        {
            "id": new_id("evt"),
            "tenant_id": account.tenant_id,
            "source_id": source["id"],
            "dedup_key": key,
            "type": "ping",
            "subject": None,
            "body": key.encode(),
            "size": len(key),
            "sha256": "0" * 64,
            "headers": {},
            "received_at": utcnow(),
            "duplicate_count": 0,
        },
        max_attempts=5,
    )


async def _count(platform: Platform, model: Any, *where: Any) -> int:
    async with platform.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def _store(platform: Platform, items: list[NewEvent]) -> list[Stored | Exception]:
    if platform.db.dialect == "postgresql":
        return await store_events_pg(platform.db, items)
    async with platform.db.transaction() as session:
        return await write_events(session, items)


async def test_duplicates_within_one_batch_and_across_batches_make_one_job_each(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    # The store the inbox writer uses: one statement on PostgreSQL, a transaction on SQLite.
    source = await create_source(client, account)
    [earlier] = await _store(platform, [_event(source, account, "c")])
    assert isinstance(earlier, Stored)
    assert earlier.status == "accepted"
    keys = ["a", "b", "a", "c", "a", "c"]
    results = await _store(platform, [_event(source, account, k) for k in keys])
    assert all(isinstance(r, Stored) for r in results)
    got = [(r.status, r.event_id) for r in results if isinstance(r, Stored)]
    a_id, b_id = got[0][1], got[1][1]
    assert got == [
        ("accepted", a_id),
        ("accepted", b_id),
        ("duplicate", a_id),
        ("duplicate", earlier.event_id),
        ("duplicate", a_id),
        ("duplicate", earlier.event_id),
    ]
    async with platform.db.sessions() as session:
        rows = await session.execute(select(InboxEvent.dedup_key, InboxEvent.duplicate_count))
        counts = {key: count for key, count in rows.all()}
        jobs = (await session.execute(select(Job.id, Job.event_id, Job.max_attempts))).all()
        payloads = (await session.scalars(select(OutboxMessage.payload))).all()
    assert counts == {"a": 2, "b": 0, "c": 2}
    assert sorted(j.event_id for j in jobs) == sorted([a_id, b_id, earlier.event_id])
    assert {j.max_attempts for j in jobs} == {5}
    # Each new job announced through the outbox once: one message per batch names its jobs.
    announced = [job_id for payload in payloads for job_id in payload.decode().split()]
    assert sorted(announced) == sorted(j.id for j in jobs)
    assert len(payloads) == 2


async def test_a_delivery_for_a_deleted_source_fails_alone_in_its_batch(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    kept = await create_source(client, account)
    gone = await create_source(client, account)
    doomed = _event(gone, account, "x")
    deleted = await client.delete(f"/v1/sources/{gone['id']}", headers=account.headers)
    assert deleted.status_code == 204
    writer = inbox_writer(platform)
    results = await asyncio.gather(
        writer.submit(_event(kept, account, "k1")),
        writer.submit(doomed),  # its source row is gone: the foreign key refuses it
        writer.submit(_event(kept, account, "k2")),
        return_exceptions=True,
    )
    assert [r.status for r in results if isinstance(r, Stored)] == ["accepted", "accepted"]
    assert isinstance(results[1], Exception)
    assert await _count(platform, InboxEvent) == 2
    assert await _count(platform, Job) == 2


async def test_a_store_failure_answers_503_and_never_202(
    client: httpx.AsyncClient,
    account: Account,
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = await create_source(client, account)

    async def down(*_: Any, **__: Any) -> list[str]:
        raise OperationalError("INSERT", {}, Exception("connection reset"))

    body = b'{"zen": "keep it logically awesome"}'
    with monkeypatch.context() as patch:
        patch.setattr(repository, "insert_events", down)
        patch.setattr(repository, "store_events_pg", down)
        refused = await deliver(client, source, body, msg_id="d-1")
    assert_problem(refused, 503, "ingest-unavailable")
    assert refused.headers["retry-after"] == "1"
    assert await _count(platform, InboxEvent) == 0
    # The provider's retry is stored as new: nothing was half-stored.
    retried = await deliver(client, source, body, msg_id="d-1")
    assert retried.status_code == 202, retried.text
    assert await _count(platform, Job) == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_connection_lost_under_the_one_statement_store_is_not_reused(
    client: httpx.AsyncClient,
    account: Account,
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-statement store is PostgreSQL's (SQLite writes through the ORM session)."""
    assert platform.db.dialect == "postgresql"
    source = await create_source(client, account)
    real = repository.store_events_pg

    async def lost(connection: Any, *args: Any) -> list[str]:
        await connection.close()  # as if the server went away: the call below fails
        return await real(connection, *args)

    with monkeypatch.context() as patch:
        patch.setattr(repository, "store_events_pg", lost)
        refused = await deliver(client, source, b'{"n": 0}', msg_id="lost-0")
    assert_problem(refused, 503, "ingest-unavailable")
    # The closed connection left the pool: every connection handed out next works.
    pool_size = platform.db.engine.pool.size()
    for n in range(pool_size + 2):
        stored = await deliver(client, source, b'{"n": %d}' % n, msg_id=f"lost-{n}")
        assert stored.status_code == 202, stored.text


# --- job bookkeeping --------------------------------------------------------------------------


async def test_one_job_claimed_twice_at_once_runs_once(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    source = await create_source(client, account)
    accepted = await deliver(client, source, b'{"a": 1}', msg_id="claim-me")
    assert accepted.status_code == 202

    async def job_id() -> str:
        async with platform.db.sessions() as session:
            return str(await session.scalar(select(Job.id)))

    job = await job_id()
    claims = await asyncio.gather(*(bookkeeping.claims(platform).submit(job) for _ in range(3)))
    won = [c for c in claims if c is not None]
    # The embedded app's own worker may have claimed it first; never more than one claim wins.
    assert len(won) <= 1
    if won:
        assert won[0].attempt == 1
        assert won[0].event.id == accepted.json()["event_id"]

    async def finished_or_running() -> bool:
        async with platform.db.sessions() as session:
            status = await session.scalar(select(Job.status).where(Job.id == job))
        return status in ("running", "succeeded")

    await eventually(finished_or_running, what="the job to be claimed")


# --- one outbox message per batch and tenant --------------------------------------------------


async def test_a_batch_announces_its_jobs_in_one_message_per_tenant_and_all_of_them_run(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    other = await signup(client)
    mine = await create_source(client, account)
    theirs = await create_source(client, other)
    items = [_event(mine, account, f"m{n}") for n in range(3)]
    items += [_event(theirs, other, f"t{n}") for n in range(2)]
    results = await _store(platform, items)
    assert [r.status for r in results if isinstance(r, Stored)] == ["accepted"] * 5
    async with platform.db.sessions() as session:
        rows = (await session.execute(select(OutboxMessage.tenant_id, OutboxMessage.payload))).all()
        jobs = {j.id: j.tenant_id for j in (await session.scalars(select(Job))).all()}
    named = {tenant: payload.decode().split() for tenant, payload in rows}
    assert len(rows) == 2
    assert sorted(named) == sorted([account.tenant_id, other.tenant_id])
    for tenant, job_ids in named.items():
        assert sorted(job_ids) == job_ids
        assert {jobs[job_id] for job_id in job_ids} == {tenant}
    assert sorted(j for ids in named.values() for j in ids) == sorted(jobs)
    # One message runs all the jobs it names; a second delivery of it runs none again.
    for _, payload in rows:
        message = Message(body=payload, message_id="m")
        await ingest_worker.handle_job(platform, message)
        await ingest_worker.handle_job(platform, message)
    async with platform.db.sessions() as session:
        done = (await session.execute(select(Job.status, Job.attempts))).all()
    assert done == [("succeeded", 1)] * 5


# --- GC freeze --------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_the_first_writer_freezes_the_started_process_once(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    monkeypatch.setattr(gcpolicy, "_frozen", set())
    monkeypatch.setattr(platform.settings, "gc_freeze", enabled)
    frozen = []
    monkeypatch.setattr(gcpolicy.gc, "freeze", lambda: frozen.append(1))
    batcher.freeze_startup_objects(platform)
    batcher.freeze_startup_objects(platform)
    assert frozen == ([1] if enabled else [])
