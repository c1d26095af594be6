"""Hot reads straight on the database driver: prebuilt SELECTs, no ORM session, no thread hop.

Why it exists: one indexed SELECT through the async ORM session costs ~750 µs of CPU here
(aiosqlite crosses a thread four times per statement; the session, greenlet and compiled-cache
lookups add the rest). The same statement costs ~10 µs on `sqlite3` and ~12 µs on asyncpg.
GET routes that list or fetch a tenant's rows are the busiest paths, so they come here.

The statements stay SQLAlchemy Core (one definition, both dialects), compiled once per dialect,
and every value passes through its column type's own bind and result processors, so rows hold
what the ORM would have loaded. Only reads: nothing here can write.

SQLite: a `query_only` connection used on the event loop's thread. An indexed read of a page of
rows takes microseconds, less than one thread hand-off; in WAL mode readers do not wait for the
writer. The rare SQLITE_BUSY (a checkpoint restarting the WAL) falls back to the async engine.
PostgreSQL: connections of an asyncpg pool of its own (SQLAlchemy's JSON codecs), kept and
lent out without the pool's per-read bookkeeping; a read that finds its connection dead (a
restart, a terminated backend) is retried once on a fresh one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy import Select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from relayport.core.errors import DatabaseUnavailable

Processor = Callable[[Any], Any] | None


# A connection lost under a read (a restart, a terminated backend; the protocol may also be
# left mid-operation or report the shutdown itself): worth one retry on a fresh connection.
_PG_LOST = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A kept connection the server closed while it sat idle: asyncpg hands it back to its pool
    # by itself, and the handle we hold answers "released back to the pool".
    asyncpg.InterfaceError,
    OSError,
)
# The server is there but will not answer now: a 503 at once.
_PG_REFUSED = (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError, TimeoutError)


class Compiled:
    """One statement compiled for one dialect: SQL text, parameter order, value processors."""

    def __init__(self, stmt: Select[Any], dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self.names = tuple(compiled.positiontup or ())
        binds = compiled.binds
        self.bind_processors = tuple(
            binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self.names
        )
        # Values the statement carries itself (e.g. SQLite's `OFFSET ?` after a LIMIT).
        self.defaults = {
            name: binds[name].effective_value for name in self.names if not binds[name].required
        }
        columns = list(stmt.selected_columns)
        self.result_processors = tuple(
            (i, proc)
            for i, col in enumerate(columns)
            if (proc := _result_processor(col, dialect)) is not None
        )
        self.record: Any = collections.namedtuple("Record", [c.key for c in columns])  # type: ignore[misc]

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        try:
            values = [
                params[name] if name in params else self.defaults[name] for name in self.names
            ]
        except KeyError as exc:
            raise TypeError(f"missing parameter {exc.args[0]!r} for {self.sql!r}") from None
        return tuple(
            proc(v) if proc is not None else v
            for proc, v in zip(self.bind_processors, values, strict=True)
        )

    def records(self, rows: Iterable[Sequence[Any]]) -> list[Any]:
        make = self.record._make
        procs = self.result_processors
        if not procs:
            return [make(row) for row in rows]
        out = []
        for row in rows:
            values = list(row)
            for i, proc in procs:
                values[i] = proc(values[i])
            out.append(make(values))
        return out


def _result_processor(column: Any, dialect: Dialect) -> Processor:
    # Processors are asked for without the driver's column type (there is no cursor yet);
    # the types in use (strings, integers, booleans, UTC datetimes, JSON) do not need it, and
    # one that does (e.g. Numeric on asyncpg) is refused here, when the query is compiled.
    try:
        processor: Processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
    except (TypeError, KeyError) as exc:
        raise TypeError(
            f"column {column.key!r} of type {column.type!r} cannot be read on the driver "
            f"({dialect.name}); read it through the ORM"
        ) from exc
    return processor


class Query:
    """A SELECT with `bindparam`s, compiled lazily for each dialect it runs on."""

    def __init__(self, stmt: Select[Any]) -> None:
        self.stmt = stmt
        self._compiled: dict[str, Compiled] = {}

    def compiled(self, dialect: Dialect) -> Compiled:
        found = self._compiled.get(dialect.name)
        if found is None:
            found = self._compiled[dialect.name] = Compiled(self.stmt, dialect)
        return found


class DriverReads:
    """Runs `Query`s on the driver of `engine`'s database; what the fast path cannot serve
    (an in-memory SQLite database, a busy file) goes through `engine` itself."""

    def __init__(self, engine: AsyncEngine, *, pool_size: int, in_memory: bool = False) -> None:
        self.dialect = engine.dialect
        self._engine = engine
        self._pool_size = pool_size
        self._memory = in_memory
        # One sqlite3 connection per thread: the loop's thread in a server; tests and the CLI
        # may run loops on other threads, and a sqlite3 connection refuses foreign threads.
        self._local = threading.local()
        self._sqlite_conns: list[sqlite3.Connection] = []
        # PostgreSQL connections, opened on first use inside the running loop.
        self._kept: _KeptConnections | None = None
        self._pool_lock = asyncio.Lock()
        self._closed = False

    async def all(self, query: Query, **params: Any) -> list[Any]:
        if self._closed:
            raise DatabaseUnavailable("the database reader is closed (shutting down)")
        compiled = query.compiled(self.dialect)
        args = compiled.args(params)
        if self.dialect.name == "sqlite":
            rows = self._sqlite_rows(compiled.sql, args)
            if rows is None:
                rows = await self._engine_rows(compiled.sql, args)
        elif self.dialect.name == "postgresql":
            rows = await self._pg_rows(compiled.sql, args)
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            rows = await self._engine_rows(compiled.sql, args)
        return compiled.records(rows)

    async def first(self, query: Query, **params: Any) -> Any | None:
        rows = await self.all(query, **params)
        return rows[0] if rows else None

    async def _engine_rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        async with self._engine.connect() as conn:
            result = await conn.exec_driver_sql(sql, args)
            return list(result.all())

    # SQLite -----------------------------------------------------------------------------------

    def _sqlite_rows(self, sql: str, args: tuple[Any, ...]) -> list[Any] | None:
        if self._memory:
            return None  # one in-memory database per connection: only the engine's is the one
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open_sqlite()
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return None  # the engine's connection waits out its busy timeout off the loop
            raise

    def _open_sqlite(self) -> sqlite3.Connection:
        # timeout=0: never wait on the loop's thread; BUSY falls back to the async engine.
        url = self._engine.url
        conn = sqlite3.connect(
            url.database or "",
            timeout=0,
            isolation_level=None,
            uri=url.query.get("uri") == "true",
        )
        conn.execute("PRAGMA query_only=ON")
        self._sqlite_conns.append(conn)
        return conn

    # PostgreSQL -------------------------------------------------------------------------------

    async def _pg_rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        kept = self._kept or await self._create_pool()
        try:
            return await kept.fetch(sql, args)
        except _PG_LOST:
            # A connection that died under us (a restart, a terminated backend): the idle ones
            # are most likely dead too, so renew them all, and try once more (a read is safe
            # to repeat).
            await kept.expire()
        except _PG_REFUSED as exc:
            # Slow or full: repeating would only add load.
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        try:
            return await kept.fetch(sql, args)
        except (*_PG_LOST, *_PG_REFUSED) as exc:
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc

    async def _create_pool(self) -> _KeptConnections:
        async with self._pool_lock:
            if self._closed:
                raise DatabaseUnavailable("the database reader is closed (shutting down)")
            if self._kept is None:
                _, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
                cache = kwargs.pop("prepared_statement_cache_size", None)
                if cache is not None:
                    kwargs["statement_cache_size"] = cache
                for key in ("prepared_statement_name_func", "async_creator_fn"):
                    kwargs.pop(key, None)
                kwargs.setdefault("command_timeout", 30)
                # Connecting waits behind this lock: an unreachable host must fail fast.
                kwargs.setdefault("timeout", 5)
                try:
                    pool = await asyncpg.create_pool(
                        min_size=1,
                        max_size=self._pool_size,
                        init=_pg_codecs,
                        reset=_keep_session,
                        **kwargs,
                    )
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
                self._kept = _KeptConnections(pool, self._pool_size)
        return self._kept

    async def close(self, timeout_s: float = 10) -> None:
        """Close the connections; reads after this raise DatabaseUnavailable."""
        self._closed = True
        for conn in self._sqlite_conns:
            conn.close()
        self._sqlite_conns.clear()
        self._local = threading.local()
        async with self._pool_lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            await kept.close(timeout_s)


class _KeptConnections:
    """Connections taken from an asyncpg pool once and then lent out by this object.

    asyncpg's `Pool.acquire()`/`release()` cost ~45 µs of CPU per read on this machine (a
    shield, a task, holder bookkeeping), four times the ~12 µs of the read itself. The pool
    still opens, initialises (codecs) and closes the connections; reads borrow them from a
    free list here. A connection in doubt (lost, timed out, cancelled mid-read) goes back to
    the pool, which cleans up or closes it, and a new one is taken next time. A query error
    (bad input) leaves the connection usable: outside a transaction there is nothing to undo.

    What the pool would do on release is done here: a connection idle for `idle_s` goes back
    (so a burst's connections do not stay open for good; the most recently used is kept),
    and so does one taken before `expire()` (a renewal after a restart).
    """

    def __init__(self, pool: Any, size: int, *, idle_s: float = 300.0) -> None:
        self.pool = pool  # asyncpg.Pool
        self._size = size
        self._idle_s = idle_s
        # (connection, generation it was taken in, when it came back), oldest first.
        self._free: collections.deque[tuple[Any, int, float]] = collections.deque()
        self._lent = 0  # connections taken from the pool: free here or in a read
        self._generation = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._releasing: set[asyncio.Task[None]] = set()
        self._pruning: asyncio.TimerHandle | None = None
        self._closed = False

    async def fetch(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        conn, generation = await self._take()
        try:
            rows = await conn.fetch(sql, *args)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, _PG_LOST):
                await self._drop(conn)
            else:
                self._give(conn, generation)
            raise
        except BaseException:
            await self._drop(conn)
            raise
        self._give(conn, generation)
        return list(rows)

    async def _take(self) -> tuple[Any, int]:
        while True:
            if self._closed:
                raise DatabaseUnavailable("the database reader is closed (shutting down)")
            if self._free:
                conn, generation, _ = self._free.pop()  # the most recently used: warm
                return conn, generation
            if self._lent < self._size:
                self._lent += 1
                generation = self._generation
                try:
                    return await self.pool.acquire(), generation
                except BaseException:
                    self._lent -= 1
                    self._wake()
                    raise
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken just as it was cancelled: pass the turn on
                raise

    def _give(self, conn: Any, generation: int) -> None:
        if self._closed or generation != self._generation:
            self._release_soon(conn)
            self._wake()
            return
        self._free.append((conn, generation, time.monotonic()))
        if self._pruning is None and len(self._free) > 1:
            self._pruning = asyncio.get_running_loop().call_later(self._idle_s, self._prune)
        self._wake()

    def _prune(self) -> None:
        """Connections idle for `idle_s` go back to the pool; one stays for the next read."""
        self._pruning = None
        deadline = time.monotonic() - self._idle_s
        while len(self._free) > 1 and self._free[0][2] <= deadline:
            self._release_soon(self._free.popleft()[0])
        if len(self._free) > 1:
            wait = self._free[0][2] - deadline
            self._pruning = asyncio.get_running_loop().call_later(wait, self._prune)

    def _release_soon(self, conn: Any) -> None:
        self._lent -= 1
        task = asyncio.ensure_future(self.pool.release(conn))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled():
            task.exception()  # a failed release closed the connection; nothing to add

    async def _drop(self, conn: Any) -> None:
        self._lent -= 1
        self._wake()
        await self.pool.release(conn)  # asyncpg finishes or cancels what was running, or closes

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def expire(self) -> None:
        """Renew every connection: idle ones now, those in a read when it ends."""
        self._generation += 1
        free, self._free = list(self._free), collections.deque()
        self._lent -= len(free)
        for conn, _, _ in free:
            await self.pool.release(conn)
        await self.pool.expire_connections()
        self._wake()

    async def close(self, timeout_s: float) -> None:
        self._closed = True
        if self._pruning is not None:
            self._pruning.cancel()
        free, self._free = list(self._free), collections.deque()
        self._lent -= len(free)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # they find the reader closed
        try:
            for conn, _, _ in free:
                await self.pool.release(conn)
            await asyncio.wait_for(self.pool.close(), timeout_s)
        except TimeoutError:
            self.pool.terminate()  # reads still running past the shutdown bound are cut off


async def _keep_session(conn: Any) -> None:
    """The pool's reset between borrowers. asyncpg's default sends `RESET ALL; UNLISTEN *;
    CLOSE ALL; SELECT pg_advisory_unlock_all()` on every release, a round trip that cost more
    than the read itself; this pool only runs single SELECTs, which leave no session state
    (an open transaction is still rolled back by asyncpg before this is called)."""


async def _pg_codecs(conn: Any) -> None:
    """The JSON codecs SQLAlchemy's asyncpg dialect installs, so values decode the same way."""
    await conn.set_type_codec(
        "json",
        encoder=str.encode,
        decoder=lambda b: json.loads(b.decode()),
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda s: b"\x01" + s.encode(),
        decoder=lambda b: json.loads(b[1:].decode()),
        schema="pg_catalog",
        format="binary",
    )
