"""Transactional outbox: a state change and the message announcing it commit together.

A service calls `enqueue(session, ...)` inside the transaction that changes state; an
`OutboxRelay` publishes committed rows to the broker and marks them sent. The relay publishes
before its mark commits, so a crash in between publishes the row again: delivery is
at-least-once, and consumers dedupe by the message id, which is the row's and never changes.

Several relays can run against PostgreSQL: each claims its batch with
`FOR UPDATE SKIP LOCKED`, holding the row locks while it publishes, so no two relays publish
the same row at the same time. SQLite has no row locks; there the one in-process relay runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import JSON, CursorResult, Index, LargeBinary, Row, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from relayport.core.broker import Broker, check_queue_name
from relayport.core.db import Base, Database, utcnow
from relayport.core.ids import new_id
from relayport.settings import OutboxSettings

if TYPE_CHECKING:
    # id, topic, message_id, payload, headers, attempts: the columns the relay claims.
    _ClaimedRow = Row[str, str, str, bytes, dict[str, str], int]

logger = logging.getLogger(__name__)

BASE_BACKOFF_MS = 250
MAX_ERROR_CHARS = 1_000


class OutboxMessage(Base):
    __tablename__ = "outbox"
    # The relay's scan is `sent_at IS NULL AND available_at <= now ORDER BY available_at`.
    __table_args__ = (Index("ix_outbox_sent_at_available_at", "sent_at", "available_at"),)

    id: Mapped[str] = mapped_column(primary_key=True)
    tenant_id: Mapped[str | None]
    topic: Mapped[str]
    message_id: Mapped[str]
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime]
    available_at: Mapped[dt.datetime]
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None]
    sent_at: Mapped[dt.datetime | None]


def enqueue(
    session: AsyncSession,
    *,
    topic: str,
    payload: bytes,
    message_id: str | None = None,
    tenant_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> OutboxMessage:
    """Add a message to the caller's transaction; it is published only if that commits.

    `message_id` defaults to the row id. After committing, call `OutboxRelay.wake()` to have
    it published now rather than at the relay's next poll.
    """
    row = OutboxMessage(
        **outbox_values(
            topic=topic,
            payload=payload,
            message_id=message_id,
            tenant_id=tenant_id,
            headers=headers,
        )
    )
    session.add(row)
    return row


def outbox_values(
    *,
    topic: str,
    payload: bytes,
    message_id: str | None = None,
    tenant_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The column values of one new outbox row, for callers that insert many rows at once
    (`insert(OutboxMessage).values([...])`) in their transaction instead of `enqueue`."""
    check_queue_name(topic)  # fail in the caller's transaction, not forever in the relay
    row_id = new_id("obx")
    now = now or utcnow()
    return {
        "id": row_id,
        "tenant_id": tenant_id,
        "topic": topic,
        "message_id": message_id or row_id,
        "payload": payload,
        "headers": dict(headers or {}),
        "created_at": now,
        "available_at": now,
        "attempts": 0,
        "last_error": None,
        "sent_at": None,
    }


def publish_backoff_ms(attempts: int, cap_ms: int, rng: random.Random | None = None) -> int:
    """Delay before the next publish try after `attempts` failures: exponential, jittered.

    The jitter spreads relays that failed together (a broker restart) so they do not all retry
    in the same instant; half the delay stays fixed so a retry never comes immediately.
    """
    exponent = min(max(attempts - 1, 0), 30)
    ceiling = min(cap_ms, BASE_BACKOFF_MS * 2**exponent)
    return (rng or random).randint(ceiling // 2, ceiling)


async def pending_count(db: Database) -> int:
    """Unsent rows, due or backing off: the `outbox_pending` gauge."""
    async with db.sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
        )
    return int(count or 0)


async def purge_sent(db: Database, *, before: dt.datetime, limit: int = 10_000) -> int:
    """Delete up to `limit` rows sent before `before`; the table otherwise only grows."""
    async with db.transaction() as session:
        ids = select(OutboxMessage.id).where(OutboxMessage.sent_at < before).limit(limit)
        result = await session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))
    return cast(CursorResult[Any], result).rowcount


class OutboxRelay:
    """Moves committed outbox rows to the broker."""

    def __init__(
        self,
        db: Database,
        broker: Broker,
        settings: OutboxSettings,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self._db = db
        self._broker = broker
        self._settings = settings
        self._clock = clock  # injectable so tests step past a backoff without waiting
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Publish now instead of at the next poll (call after committing an enqueue)."""
        self._wake.set()

    async def run_once(self) -> int:
        """Claim one batch of due rows, publish them, mark them; return how many were sent."""
        sent, _claimed = await self._run_batch()
        return sent

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; idle polls wait `poll_interval_ms` or a `wake()`."""
        poll = self._settings.poll_interval_ms / 1000
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                _sent, claimed = await self._run_batch()
                failures = 0
            except Exception:
                # The database is away (restart, failover): log, back off, try again; the
                # backoff keeps a long outage from logging five tracebacks a second.
                failures += 1
                logger.exception(
                    "outbox relay batch failed",
                    extra={"event": "outbox.error", "consecutive_failures": failures},
                )
                delay_ms = publish_backoff_ms(
                    failures, self._settings.max_publish_backoff_ms, self._rng
                )
                await _wait_any(stop, seconds=max(poll, delay_ms / 1000))
                continue
            if claimed >= self._settings.batch_size:
                continue  # a full batch: more is probably waiting
            await _wait_any(stop, self._wake, seconds=poll)

    async def _run_batch(self) -> tuple[int, int]:
        now = self._clock()
        query = (
            select(
                OutboxMessage.id,
                OutboxMessage.topic,
                OutboxMessage.message_id,
                OutboxMessage.payload,
                OutboxMessage.headers,
                OutboxMessage.attempts,
            )
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.available_at <= now)
            .order_by(OutboxMessage.available_at, OutboxMessage.id)
            .limit(self._settings.batch_size)
        )
        if self._db.dialect == "postgresql":
            # Another relay's claimed rows are skipped, not waited on; its locks last until
            # its marks commit, so a row is never published by two relays at once.
            query = query.with_for_update(skip_locked=True)
        async with self._db.transaction() as session:
            rows = (await session.execute(query)).all()
            if not rows:
                return 0, 0
            # Publishes pipeline on the confirm channel: the batch costs about one round trip.
            outcomes = await asyncio.gather(
                *(self._publish(row) for row in rows), return_exceptions=True
            )
            sent_at = self._clock()
            sent_ids: list[str] = []
            for row, outcome in zip(rows, outcomes, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                if isinstance(outcome, BaseException):
                    await self._record_failure(session, row, outcome, sent_at)
                else:
                    sent_ids.append(row.id)
            if sent_ids:
                await session.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id.in_(sent_ids))
                    .values(sent_at=sent_at, attempts=OutboxMessage.attempts + 1, last_error=None)
                    .execution_options(synchronize_session=False)
                )
        return len(sent_ids), len(rows)

    async def _publish(self, row: _ClaimedRow) -> None:
        await self._broker.publish(
            row.topic, row.payload, message_id=row.message_id, headers=row.headers or {}
        )

    async def _record_failure(
        self, session: AsyncSession, row: _ClaimedRow, error: BaseException, now: dt.datetime
    ) -> None:
        attempts = int(row.attempts) + 1
        delay_ms = publish_backoff_ms(attempts, self._settings.max_publish_backoff_ms, self._rng)
        logger.warning(
            "outbox publish failed",
            extra={
                "event": "outbox.publish_failed",
                "outbox_id": row.id,
                "topic": row.topic,
                "attempts": attempts,
                "retry_in_ms": delay_ms,
                "error": repr(error),
            },
        )
        await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == row.id)
            .values(
                attempts=attempts,
                last_error=f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS],
                available_at=now + dt.timedelta(milliseconds=delay_ms),
            )
            .execution_options(synchronize_session=False)
        )


async def _wait_any(*events: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
