"""Hot reads straight on the database driver: prebuilt SELECTs, no ORM session, no thread hop.

Why it exists: one indexed SELECT through the async ORM session costs ~750 µs of CPU here
(aiosqlite crosses a thread four times per statement; the session, greenlet and compiled-cache
lookups add the rest). The same statement costs ~10 µs on `sqlite3` and ~50 µs on asyncpg.
GET routes that list or fetch a tenant's rows are the busiest paths, so they come here.

The statements stay SQLAlchemy Core (one definition, both dialects), compiled once per dialect,
and every value passes through its column type's own bind and result processors, so rows hold
what the ORM would have loaded. Only reads: nothing here can write.

SQLite: a `query_only` connection used on the event loop's thread. An indexed read of a page of
rows takes microseconds, less than one thread hand-off; in WAL mode readers do not wait for the
writer. The rare SQLITE_BUSY (a checkpoint restarting the WAL) falls back to the async engine.
PostgreSQL: an asyncpg pool of its own, with SQLAlchemy's JSON codecs; a read that finds its
connection dead (a restart, a terminated backend) is retried once on a fresh one.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy import Select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

Processor = Callable[[Any], Any] | None


# What a lost or refused connection raises: a terminated backend may also leave the protocol
# mid-operation (InternalClientError) or report the shutdown itself (AdminShutdownError).
_PG_GONE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    OSError,
    TimeoutError,
)


class DatabaseUnavailable(Exception):
    """The database could not answer a read (unreachable, restarting, out of connections)."""


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
            if (proc := col.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
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
    """Runs `Query`s on the driver of `engine`'s database; `fallback` is an async engine on
    the same database for what the fast path cannot serve."""

    def __init__(self, engine: AsyncEngine, *, fallback: AsyncEngine, pool_size: int) -> None:
        self.dialect = engine.dialect
        self._engine = engine
        self._fallback = fallback
        self._pool_size = pool_size
        self._sqlite: sqlite3.Connection | None = None
        self._pool: Any = None  # asyncpg.Pool, created on first use inside the running loop
        self._pool_lock = asyncio.Lock()
        self._memory = engine.url.database in (None, "", ":memory:")

    async def all(self, query: Query, **params: Any) -> list[Any]:
        compiled = query.compiled(self.dialect)
        args = compiled.args(params)
        if self.dialect.name == "sqlite":
            rows = self._sqlite_rows(compiled.sql, args)
            if rows is None:
                rows = await self._fallback_rows(compiled.sql, args)
        elif self.dialect.name == "postgresql":
            rows = await self._pg_rows(compiled.sql, args)
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            rows = await self._fallback_rows(compiled.sql, args)
        return compiled.records(rows)

    async def first(self, query: Query, **params: Any) -> Any | None:
        rows = await self.all(query, **params)
        return rows[0] if rows else None

    # SQLite -----------------------------------------------------------------------------------

    def _sqlite_rows(self, sql: str, args: tuple[Any, ...]) -> list[Any] | None:
        if self._memory:
            return None  # one in-memory database per connection: only the engine's is the one
        conn = self._sqlite
        if conn is None:
            conn = self._sqlite = self._open_sqlite()
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return None
            raise

    def _open_sqlite(self) -> sqlite3.Connection:
        # timeout=0: never wait on the loop's thread; BUSY falls back to the async engine.
        # check_same_thread=False: the connection is only used on the loop's thread, but test
        # clients may run that loop on a thread other than the one that created the app.
        conn = sqlite3.connect(
            self._engine.url.database or "",
            timeout=0,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA query_only=ON")
        return conn

    async def _fallback_rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        async with self._fallback.connect() as conn:
            result = await conn.exec_driver_sql(sql, args)
            return list(result.all())

    # PostgreSQL -------------------------------------------------------------------------------

    async def _pg_rows(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        pool = self._pool or await self._create_pool()
        for attempt in (1, 2):
            try:
                # No acquire timeout: asyncio.timeout() around it cost ~25 µs per read; the
                # concurrency gate bounds the queue, `command_timeout` bounds each query.
                async with pool.acquire() as conn:
                    return list(await conn.fetch(sql, *args))
            except _PG_GONE as exc:
                # A dead connection after a restart: every idle one is dead too, so drop them
                # all and retry once (a read is safe to repeat).
                await pool.expire_connections()
                if attempt == 2:
                    raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _create_pool(self) -> Any:
        async with self._pool_lock:
            if self._pool is None:
                _, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
                cache = kwargs.pop("prepared_statement_cache_size", None)
                if cache is not None:
                    kwargs["statement_cache_size"] = cache
                for key in ("prepared_statement_name_func", "async_creator_fn"):
                    kwargs.pop(key, None)
                kwargs.setdefault("command_timeout", 30)
                try:
                    self._pool = await asyncpg.create_pool(
                        min_size=1,
                        max_size=self._pool_size,
                        init=_pg_codecs,
                        reset=_keep_session,
                        **kwargs,
                    )
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        return self._pool

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


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
