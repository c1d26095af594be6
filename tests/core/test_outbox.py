"""The transactional outbox on SQLite and PostgreSQL, and a relay killed mid-batch."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from relayport.core.broker import Handler, InProcessBroker, Message
from relayport.core.broker_rabbitmq import RabbitMQBroker
from relayport.core.db import Base, Database, utcnow
from relayport.core.outbox import (
    OutboxMessage,
    OutboxRelay,
    enqueue,
    pending_count,
    publish_backoff_ms,
    purge_sent,
)
from relayport.settings import OutboxSettings
from tests.fixtures.services import wait_until

Published = tuple[str, bytes, str, dict[str, str]]


class RecordingBroker:
    """Records publishes; fails those `fail` says should fail; can add publish latency."""

    def __init__(
        self,
        fail: Callable[[str, str], bool] = lambda _topic, _id: False,
        latency: float = 0.0,
    ) -> None:
        self.published: list[Published] = []
        self.attempts = 0
        self.fail = fail
        self.latency = latency

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.attempts += 1
        if self.latency:
            await asyncio.sleep(self.latency)  # stands in for the broker's round trip
        if self.fail(queue, message_id):
            raise ConnectionError("broker unreachable")
        self.published.append((queue, body, message_id, dict(headers or {})))

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16) -> None:
        raise NotImplementedError


async def open_database(url: str) -> Database:
    database = Database(url, pool_size=4)
    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all, tables=[Base.metadata.tables["outbox"]])
        await conn.execute(delete(OutboxMessage))  # the PostgreSQL database is per module
    return database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = await open_database(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    else:
        database = await open_database(request.getfixturevalue("postgres_database_url"))
    yield database
    await database.dispose()


@pytest.fixture
async def pg_db(postgres_database_url: str) -> AsyncIterator[Database]:
    database = await open_database(postgres_database_url)
    yield database
    await database.dispose()


@pytest.fixture
def rabbitmq_url(amqp_url: str) -> str:
    return amqp_url


def settings(**overrides: int) -> OutboxSettings:
    return OutboxSettings(**overrides)


async def rows(db: Database) -> list[OutboxMessage]:
    async with db.sessions() as session:
        return list((await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))).all())


async def test_rolled_back_enqueue_is_never_published(db: Database) -> None:
    broker = RecordingBroker()

    async def failing_state_change() -> None:
        async with db.transaction() as session:
            enqueue(session, topic="orders", payload=b"{}")
            raise RuntimeError("state change failed")

    with pytest.raises(RuntimeError, match="state change failed"):
        await failing_state_change()
    assert await OutboxRelay(db, broker, settings()).run_once() == 0
    assert broker.attempts == 0
    assert await rows(db) == []


async def test_committed_message_is_published_once_and_marked_sent(db: Database) -> None:
    broker = RecordingBroker()
    async with db.transaction() as session:
        row = enqueue(
            session,
            topic="orders",
            payload=b'{"id":1}',
            tenant_id="ten_1",
            headers={"traceparent": "00-abc-01"},
        )
    relay = OutboxRelay(db, broker, settings())
    assert await relay.run_once() == 1
    assert await relay.run_once() == 0
    assert broker.published == [("orders", b'{"id":1}', row.id, {"traceparent": "00-abc-01"})]
    (stored,) = await rows(db)
    assert stored.message_id == row.id
    assert stored.sent_at is not None
    assert stored.attempts == 1
    assert await pending_count(db) == 0


async def test_failed_publish_backs_off_then_succeeds(db: Database) -> None:
    down = True
    broker = RecordingBroker(fail=lambda _topic, _id: down)
    async with db.transaction() as session:
        enqueue(session, topic="orders", payload=b"x", message_id="evt_1")
    now = utcnow()
    relay = OutboxRelay(db, broker, settings(max_publish_backoff_ms=10_000), clock=lambda: now)

    assert await relay.run_once() == 0
    (failed,) = await rows(db)
    assert failed.sent_at is None
    assert failed.attempts == 1
    assert failed.last_error == "ConnectionError: broker unreachable"
    backoff = failed.available_at - now
    assert dt.timedelta(milliseconds=125) <= backoff <= dt.timedelta(milliseconds=250)
    assert await pending_count(db) == 1

    # Not due yet: the relay must not even try.
    down = False
    assert await relay.run_once() == 0
    assert broker.attempts == 1

    now = failed.available_at
    assert await relay.run_once() == 1
    (sent,) = await rows(db)
    assert sent.sent_at is not None
    assert sent.attempts == 2
    assert sent.last_error is None
    assert [p[2] for p in broker.published] == ["evt_1"]


async def test_one_failing_row_does_not_hold_up_the_batch(db: Database) -> None:
    broker = RecordingBroker(fail=lambda topic, _id: topic == "broken")
    async with db.transaction() as session:
        enqueue(session, topic="broken", payload=b"1")
        enqueue(session, topic="fine", payload=b"2")
    assert await OutboxRelay(db, broker, settings()).run_once() == 1
    assert [p[0] for p in broker.published] == ["fine"]
    by_topic = {r.topic: r for r in await rows(db)}
    assert by_topic["broken"].sent_at is None
    assert by_topic["broken"].last_error is not None
    assert by_topic["fine"].sent_at is not None


async def test_wake_publishes_without_waiting_for_the_poll(db: Database) -> None:
    broker = RecordingBroker()
    # A poll far beyond the test's deadline: only wake() can make the second row go out.
    relay = OutboxRelay(db, broker, settings(poll_interval_ms=600_000))
    async with db.transaction() as session:
        enqueue(session, topic="orders", payload=b"first")
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: len(broker.published) == 1, what="first batch")
        async with db.transaction() as session:
            enqueue(session, topic="orders", payload=b"second")
        relay.wake()
        await wait_until(lambda: len(broker.published) == 2, what="woken batch")
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


async def test_run_loop_survives_a_failing_database(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Base.metadata.tables["outbox"]
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all, tables=[outbox])
    broker = RecordingBroker()
    relay = OutboxRelay(db, broker, settings(poll_interval_ms=50))
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: "outbox relay batch failed" in caplog.text, what="a failure")
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all, tables=[outbox])
        async with db.transaction() as session:
            enqueue(session, topic="orders", payload=b"after the outage")
        await wait_until(lambda: len(broker.published) == 1, what="recovery")
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert not running.exception()


async def test_enqueue_refuses_a_topic_the_broker_cannot_carry(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(ValueError, match="dead-letter"):
            enqueue(session, topic="orders.dlq", payload=b"x")


async def test_full_batches_are_drained_back_to_back(db: Database) -> None:
    broker = RecordingBroker()
    async with db.transaction() as session:
        for i in range(25):
            enqueue(session, topic="bulk", payload=str(i).encode())
    relay = OutboxRelay(db, broker, settings(batch_size=10, poll_interval_ms=600_000))
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: len(broker.published) == 25, what="three batches")
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert [p[1] for p in broker.published] == [str(i).encode() for i in range(25)]


async def test_purge_removes_only_old_sent_rows(db: Database) -> None:
    async with db.transaction() as session:
        enqueue(session, topic="t", payload=b"sent")
    await OutboxRelay(db, RecordingBroker(), settings()).run_once()
    async with db.transaction() as session:
        enqueue(session, topic="t", payload=b"pending")
    assert await purge_sent(db, before=utcnow() + dt.timedelta(seconds=1)) == 1
    assert [r.payload for r in await rows(db)] == [b"pending"]


def test_backoff_grows_and_stays_under_the_cap() -> None:
    rng = random.Random(7)
    ceilings = [publish_backoff_ms(n, 30_000, rng) for n in range(1, 40)]
    assert all(0 < d <= 30_000 for d in ceilings)
    assert 125 <= ceilings[0] <= 250
    assert all(d >= 15_000 for d in ceilings[10:])


@pytest.mark.postgres
async def test_concurrent_relays_publish_every_row_exactly_once(pg_db: Database) -> None:
    db = pg_db
    total = 300
    async with db.transaction() as session:
        for i in range(total):
            enqueue(session, topic="fanout", payload=str(i).encode())
    broker_a, broker_b = RecordingBroker(latency=0.001), RecordingBroker(latency=0.001)
    second_db = Database(db.url, pool_size=4)  # a second "process" with its own pool
    relays = [
        OutboxRelay(db, broker_a, settings(batch_size=15)),
        OutboxRelay(second_db, broker_b, settings(batch_size=15)),
    ]

    async def drain(relay: OutboxRelay) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while await pending_count(db) and asyncio.get_running_loop().time() < deadline:
            await relay.run_once()

    try:
        await asyncio.gather(*(drain(relay) for relay in relays))
    finally:
        await second_db.dispose()
    ids = [p[2] for p in broker_a.published + broker_b.published]
    stored = await rows(db)
    assert sorted(ids) == sorted(r.message_id for r in stored)  # every row, none twice
    assert broker_a.published, "both relays must take part, or nothing was concurrent"
    assert broker_b.published, "both relays must take part, or nothing was concurrent"
    assert {(r.sent_at is not None, r.attempts) for r in stored} == {(True, 1)}


STALLING_RELAY = """
import asyncio, os, sys
from relayport.core.broker_rabbitmq import RabbitMQBroker
from relayport.core.db import Database
from relayport.core.outbox import OutboxRelay
from relayport.settings import OutboxSettings

db_url, amqp_url, marker = sys.argv[1:4]

class StallAfterFirstConfirm:
    def __init__(self, inner):
        self.inner = inner

    async def publish(self, queue, body, *, message_id, headers=None):
        await self.inner.publish(queue, body, message_id=message_id, headers=headers)
        with open(marker + ".tmp", "w") as out:
            out.write(message_id)
        os.replace(marker + ".tmp", marker)  # the test never sees a half-written marker
        await asyncio.Event().wait()  # confirmed, but the mark never commits

async def main():
    broker = RabbitMQBroker(amqp_url)
    await broker.start()
    relay = OutboxRelay(Database(db_url), StallAfterFirstConfirm(broker), OutboxSettings())
    await relay.run_once()

asyncio.run(main())
"""


@pytest.mark.postgres
@pytest.mark.rabbitmq
async def test_relay_killed_after_publish_before_mark_republishes(
    pg_db: Database, rabbitmq_url: str, tmp_path: Path
) -> None:
    db = pg_db
    topic = f"t.kill.{secrets.token_hex(4)}"
    async with db.transaction() as session:
        row = enqueue(session, topic=topic, payload=b"survives")
    marker = tmp_path / "published"
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLING_RELAY, db.url, rabbitmq_url, str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_until(
            lambda: marker.exists() or proc.poll() is not None, timeout=60, what="marker"
        )
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert marker.read_text() == row.message_id
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
    (stored,) = await rows(db)
    assert stored.sent_at is None  # the kill really came between publish and mark

    broker = RabbitMQBroker(rabbitmq_url)
    await broker.start()
    received: list[Message] = []

    async def handler(message: Message) -> None:
        received.append(message)

    try:
        await broker.consume(topic, handler)
        relay = OutboxRelay(db, broker, settings())
        # The killed session's row lock lingers until PostgreSQL notices the dead socket,
        # and SKIP LOCKED passes over it until then: retry until the row is claimed.
        deadline = asyncio.get_running_loop().time() + 30
        while await relay.run_once() == 0:
            assert asyncio.get_running_loop().time() < deadline, "row never reclaimed"
            await asyncio.sleep(0.05)
        # Once from the killed relay (confirmed) and once from this one: at least once.
        await wait_until(lambda: len(received) >= 2, what="both deliveries")
    finally:
        await broker.close()
    assert {m.message_id for m in received} == {row.message_id}
    assert {m.body for m in received} == {b"survives"}
    (stored,) = await rows(db)
    assert stored.sent_at is not None


async def test_in_process_broker_end_to_end(db: Database) -> None:
    broker = InProcessBroker()
    await broker.start()
    received: list[Message] = []

    async def handler(message: Message) -> None:
        received.append(message)

    await broker.consume("orders", handler)
    async with db.transaction() as session:
        row = enqueue(session, topic="orders", payload=b"e2e", headers={"k": "v"})
    assert await OutboxRelay(db, broker, settings()).run_once() == 1
    await wait_until(lambda: len(received) == 1, what="delivery")
    await broker.close()
    assert received[0].message_id == row.message_id
    assert dict(received[0].headers) == {"k": "v"}
