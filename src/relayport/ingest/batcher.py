"""Group commit: concurrent callers' writes go to the database together, in one transaction.

One transaction per accepted webhook costs one WAL flush each, which caps PostgreSQL near
4,000 transactions/s on a small machine and keeps SQLite's single write lock busy. A
`GroupCommit` gathers the items submitted while it waits (at most `max_wait_s` after the first
one, at most `max_items` per batch), writes them with one `write(session, items)` call in one
transaction, and resolves each caller's future only once that transaction has committed: a
caller that got its result knows its row is durable.

While `concurrency` batches are being written, new items wait and the next batch grows, so
under load batches get larger on their own instead of queueing transactions.

A batch that fails is retried item by item, each in its own transaction, so one bad row (a
source deleted mid-flight, say) fails only its own caller; an item whose lone retry fails
too gets the exception. A caller that gives up (its task is cancelled) does not cancel the
write: the others in its batch still need it, and its row may still commit, which is safe
because the provider's retry is then acknowledged as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util import greenlet_spawn

from relayport.core import gcpolicy
from relayport.core.db import Database
from relayport.core.platform import Platform

log = logging.getLogger("relayport.ingest")

_LOCK_KEY = "ingest.sqlite_write_lock"

T = TypeVar("T")
R = TypeVar("R")

# Per item: its result, or the exception its caller should get (the batch still commits).
WriteBatch = Callable[[AsyncSession, Sequence[T]], Awaitable[Sequence[R | Exception]]]
# The same, for a writer that makes its batch atomic itself (one statement, say).
RunBatch = Callable[[Sequence[T]], Awaitable[Sequence[R | Exception]]]


def freeze_startup_objects(platform: Platform) -> None:
    """At the first delivery or job in a process, freeze what exists by then (see
    core.gcpolicy): the objects built lazily by the first unit of work included."""
    if platform.settings.gc_freeze:
        gcpolicy.freeze_once("ingest")


@contextlib.asynccontextmanager
async def raw_connection(db: Database) -> AsyncIterator[Any]:
    """A pooled connection's asyncpg connection, outside any transaction (each statement
    commits on its own), for the hot paths' one-statement writes on PostgreSQL.

    SQLAlchemy does not see errors raised on the raw connection: one that is lost (or left
    mid-statement by a cancellation) is invalidated here, so it does not go back to the pool.
    """
    # The pool's connection itself, without the Connection/AsyncConnection wrappers around it:
    # measured, checking one out and in that way cost ~165 us of CPU per batch, this way ~75 us.
    fairy = await db.engine.raw_connection()
    try:
        yield fairy.driver_connection
    except BaseException as exc:
        if not isinstance(exc, asyncpg.PostgresError):
            # Closing the adapted connection awaits, which SQLAlchemy does inside a greenlet.
            await greenlet_spawn(fairy.invalidate)
        raise
    finally:
        # Back to the pool; its reset is a no-op, as no transaction was ever begun on it.
        fairy.close()


def sqlite_write_lock(platform: Platform) -> asyncio.Lock | None:
    """On SQLite, the lock this process's ingest writers take in turn; None on PostgreSQL.

    SQLite has one writer at a time, and a connection that finds the database locked sleeps in
    SQLite's busy handler (1, 2, 5, 10 … ms) rather than being woken when the lock frees. Taking
    turns on an asyncio lock first means intake batches and job bookkeeping never wait there
    for each other, and are served in arrival order.
    """
    if platform.db.dialect != "sqlite":
        return None
    lock = platform.extras.get(_LOCK_KEY)
    if lock is None:
        lock = platform.extras[_LOCK_KEY] = asyncio.Lock()
    assert isinstance(lock, asyncio.Lock)
    return lock


class GroupCommit(Generic[T, R]):
    """Submit items; each `submit` returns once the transaction holding its item committed."""

    def __init__(
        self,
        db: Database,
        write: WriteBatch[T, R] | None,
        *,
        run: RunBatch[T, R] | None = None,
        name: str,
        max_items: int,
        max_wait_s: float,
        concurrency: int,
        lock: asyncio.Lock | None = None,
    ) -> None:
        if (write is None) == (run is None):
            raise ValueError("give either write (in our transaction) or run (atomic itself)")
        self._db = db
        self._lock = lock
        self._write = write
        self._run_items = run
        self._name = name
        self._max_items = max(1, max_items)
        self._max_wait_s = max(0.0, max_wait_s)
        self._concurrency = max(1, concurrency)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._oldest = 0.0  # monotonic time the oldest pending item arrived
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # counters for tests and logs: batches written, items in them
        self.items = 0

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((item, future))
        self._flush_ready()
        return await future

    def _flush_ready(self) -> None:
        """Start as many batches as are ready and allowed; arm the timer for the rest."""
        while self._pending and self._running < self._concurrency:
            waited = time.monotonic() - self._oldest
            if len(self._pending) < self._max_items and waited < self._max_wait_s:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(
                        self._max_wait_s - waited, self._on_timer
                    )
                return
            batch = self._pending[: self._max_items]
            del self._pending[: self._max_items]
            self._oldest = time.monotonic()  # what is left has waited through this batch
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_timer(self) -> None:
        self._timer = None
        self._oldest = min(self._oldest, time.monotonic() - self._max_wait_s)
        self._flush_ready()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            await self._write_batch(batch)
        except (
            BaseException
        ) as exc:  # cancelled at shutdown, or a bug: never leave a caller hanging
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running -= 1
            self._flush_ready()

    async def _store(self, items: list[T]) -> Sequence[R | Exception]:
        if self._run_items is not None:
            return await self._run_items(items)
        assert self._write is not None
        async with self._lock or contextlib.nullcontext(), self._db.transaction() as session:
            return await self._write(session, items)

    async def _write_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await self._store(items)
        except Exception as exc:
            if len(batch) == 1:
                _, future = batch[0]
                if not future.done():
                    future.set_exception(exc)
                return
            log.warning(
                "group commit failed; writing its items one by one",
                extra={"event": "ingest.batch_failed", "batch": self._name, "size": len(batch),
                       "error": f"{type(exc).__name__}: {exc}"[:300]},
            )  # fmt: skip
            for one in batch:
                await self._write_batch([one])
            return
        self.batches += 1
        self.items += len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller gave up; the row is stored all the same
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
