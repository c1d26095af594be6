"""Database access: one async engine per process, SQLite (embedded) or PostgreSQL.

The request's session dependency and the worker's unit of work are the only places that commit;
services receive a session and never commit themselves.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, MetaData, String, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

from relayport.core.fastread import DriverReads

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in and out, on SQLite (which keeps no zone) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime(), str: String()}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers run beside the single writer; busy_timeout makes a second writer wait
    # instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _in_memory(url: str) -> bool:
    """An in-memory SQLite database: one per connection, so it cannot be pooled or shared."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def create_engine(
    url: str, *, pool_size: int = 10, echo: bool = False, read_only: bool = False
) -> AsyncEngine:
    """The engine for `url`; `read_only` makes the engine of `Database.reads`: autocommit
    (no BEGIN/COMMIT round trips around a SELECT) and no reset when a connection goes back to
    the pool, since autocommit leaves no transaction open."""
    parsed = make_url(url)
    options: dict[str, Any] = {"echo": echo}
    if read_only:
        options.update(isolation_level="AUTOCOMMIT", pool_reset_on_return=None)
    if parsed.get_backend_name() == "sqlite":
        memory = _in_memory(url)
        if not memory and parsed.database:
            # The data dir also holds the generated keys: private to the owner from the start.
            Path(parsed.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = create_async_engine(url, poolclass=NullPool if memory else None, **options)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip on every checkout of every request and worker step.
    # After a database restart the first statement on a stale connection fails (a 503 with
    # Retry-After for a request; workers retry their step), and SQLAlchemy then discards every
    # connection older than that one, so an instance sees about one failure per restart.
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, **options)


class Database:
    """The engine and its session factory."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        # Sessions for requests that only read (GET routes): each statement runs on its own,
        # without a transaction around it. An in-memory SQLite database exists once per
        # connection, so there the reads must share the engine (and its transactions).
        self.read_engine = (
            self.engine
            if _in_memory(url)
            else create_engine(url, pool_size=pool_size, read_only=True)
        )
        self.reads = async_sessionmaker(self.read_engine, expire_on_commit=False, autoflush=False)
        # Prebuilt SELECTs on the driver itself, for the hottest GET paths (see fastread).
        self.driver = DriverReads(self.read_engine, pool_size=pool_size, in_memory=_in_memory(url))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """The one unit of work: commit on success, roll back on any exception."""
        async with self.sessions() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        try:
            await self.driver.close()
        finally:
            await self.engine.dispose()
            if self.read_engine is not self.engine:
                await self.read_engine.dispose()
