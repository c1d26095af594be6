"""Group commit for any capability: concurrent callers' writes go to the database together.

One transaction per request costs one WAL flush each and keeps SQLite's single write lock
busy. A `GroupCommit` gathers the items submitted while a batch is being written (or for at
most `max_wait_s` after the first one), writes them with one `write(session, items)` call in
one transaction (or one `run(items)` call for a writer that makes its batch atomic itself,
one statement say), and resolves each caller's future only once that has committed, so a
caller that got its result knows its rows are durable. While `concurrency` batches are being
written new items wait, so under load batches grow instead of transactions queueing.

- Each item gets its own result, or its own exception (returned by `write` for that item).
- A batch whose transaction fails is retried item by item, each in its own transaction, so
  one bad item fails only its own caller.
- A caller that is cancelled does not cancel the batch: the batch runs in its own task and the
  others in it still need it (the cancelled caller's row may still commit).
- `on_commit(results)`, if given, runs once per committed transaction, before the callers
  resume (e.g. to publish what the batch stored).

`sqlite_write_lock(platform)` is the process-wide asyncio lock writers take in turn on SQLite,
which has one writer at a time: a connection that finds the database locked sleeps in SQLite's
busy handler (1, 2, 5, 10 … 100 ms) instead of being woken when the lock frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.db import Database
from relayport.core.platform import Platform

log = logging.getLogger("relayport.groupcommit")

_LOCK_KEY = "core.sqlite_write_lock"

T = TypeVar("T")
R = TypeVar("R")

# Per item: its result, or the exception its caller should get (the batch still commits).
WriteBatch = Callable[[AsyncSession, Sequence[T]], Awaitable[Sequence[R | Exception]]]
# The same, for a writer that makes its batch atomic itself.
RunBatch = Callable[[Sequence[T]], Awaitable[Sequence[R | Exception]]]


def sqlite_write_lock(platform: Platform) -> asyncio.Lock | None:
    """On SQLite, the lock this process's writers take in turn; None on PostgreSQL."""
    if platform.db.dialect != "sqlite":
        return None
    lock = platform.extras.get(_LOCK_KEY)
    if lock is None:
        lock = platform.extras[_LOCK_KEY] = asyncio.Lock()
    assert isinstance(lock, asyncio.Lock)
    return lock


@contextlib.asynccontextmanager
async def write_transaction(platform: Platform) -> AsyncIterator[AsyncSession]:
    """`platform.db.transaction()`, taken in turn with this process's other writers on
    SQLite (see `sqlite_write_lock`)."""
    async with (
        sqlite_write_lock(platform) or contextlib.nullcontext(),
        platform.db.transaction() as session,
    ):
        yield session


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
        on_commit: Callable[[Sequence[R | Exception]], None] | None = None,
    ) -> None:
        if (write is None) == (run is None):
            raise ValueError("give either write (in our transaction) or run (atomic itself)")
        self._db = db
        self._on_commit = on_commit
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
        self._soon: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # counters for tests and logs: batches written, items in them
        self.items = 0

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((item, future))
        if self._soon is None:
            # Let the items submitted in this same loop turn join the batch.
            self._soon = asyncio.get_running_loop().call_soon(self._on_soon)
        return await future

    def _on_soon(self) -> None:
        self._soon = None
        self._flush_ready()

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
        except BaseException as exc:  # cancelled at shutdown, or a bug: never leave a caller
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
                extra={"event": "groupcommit.batch_failed", "batch": self._name,
                       "size": len(batch), "error": f"{type(exc).__name__}: {exc}"[:300]},
            )  # fmt: skip
            for one in batch:
                await self._write_batch([one])
            return
        self.batches += 1
        self.items += len(batch)
        if self._on_commit is not None:
            try:
                self._on_commit(results)
            except Exception:  # the rows are committed: their callers get them regardless
                log.exception(
                    "group commit hook failed",
                    extra={"event": "groupcommit.hook_failed", "batch": self._name},
                )
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller gave up; the row is stored all the same
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
