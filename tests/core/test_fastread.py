"""Reads on the driver (`core.fastread`, `TenantReads`): the same answers as the ORM, tenant
scoped, fresh after every commit, and resilient to a busy SQLite file and dropped PostgreSQL
connections."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import sqlite3
import threading
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Column, MetaData, Numeric, String, Table, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite

from relayport.core.auth.models import ApiKey, User
from relayport.core.auth.service import (
    API_KEY_READS,
    USER_READS,
    ApiKeyRepository,
    UserRepository,
)
from relayport.core.db import Database, utcnow
from relayport.core.errors import BadRequest, DatabaseUnavailable, NotFound
from relayport.core.fastread import Query, _KeptConnections
from relayport.core.repository import TenantReads
from relayport.core.tenants import Tenant
from relayport.delivery.models import Endpoint
from relayport.settings import Settings

COLUMNS = [c.key for c in ApiKey.__table__.c if c.key != "key_hash"]  # never read for lists


@pytest.fixture
async def db(settings_kwargs: dict[str, Any]) -> AsyncIterator[Database]:
    database = Database(Settings(**settings_kwargs).database_url)
    try:
        yield database
    finally:
        await database.dispose()


async def _seed(db: Database, tenant: str, count: int) -> list[str]:
    now = utcnow()
    ids = [f"key_{tenant}_{i:03d}" for i in range(count)]
    async with db.transaction() as session:
        session.add(Tenant(id=tenant, name=f"<script>'{tenant}'", plan="free", created_at=now))
        await session.flush()
        for i, key_id in enumerate(ids):
            session.add(
                ApiKey(
                    id=key_id,
                    tenant_id=tenant,
                    name=f"key \u202e{i}",
                    prefix="rp_abc",
                    key_hash=f"{tenant}:{i}".ljust(64, "0"),
                    role="admin",
                    created_at=now - dt.timedelta(seconds=i),
                    expires_at=None if i % 2 else now + dt.timedelta(days=1),
                )
            )
    return ids


def _as_tuple(row: Any) -> tuple[Any, ...]:
    return tuple(getattr(row, c) for c in COLUMNS)


async def test_pages_match_the_orm_value_for_value(db: Database) -> None:
    await _seed(db, "ten_a", 7)
    await _seed(db, "ten_b", 3)
    after: str | None = None
    seen = 0
    while True:
        fast = await API_KEY_READS.page(db.driver, "ten_a", limit=3, after=after)
        async with db.reads() as session:
            orm = await ApiKeyRepository(session, "ten_a").page(limit=3, after=after)
        assert [_as_tuple(r) for r in fast.items] == [_as_tuple(r) for r in orm.items]
        assert fast.next == orm.next
        for row in fast.items:
            assert row.tenant_id == "ten_a"
            assert row.created_at.tzinfo is dt.UTC
        seen += len(fast.items)
        if fast.next is None:
            break
        after = fast.next
    assert seen == 7


async def test_get_is_scoped_to_the_tenant(db: Database) -> None:
    [theirs] = await _seed(db, "ten_b", 1)
    await _seed(db, "ten_a", 1)
    assert (await API_KEY_READS.get(db.driver, "ten_b", theirs)).id == theirs
    with pytest.raises(NotFound):
        await API_KEY_READS.get(db.driver, "ten_a", theirs)
    with pytest.raises(NotFound):
        await API_KEY_READS.get(db.driver, "ten_a", "key_' OR '1'='1")
    with pytest.raises(BadRequest):
        await API_KEY_READS.page(db.driver, "ten_a", limit=0)


async def test_a_read_sees_the_commit_before_it(db: Database) -> None:
    await _seed(db, "ten_a", 1)
    assert len((await API_KEY_READS.page(db.driver, "ten_a")).items) == 1
    async with db.transaction() as session:
        session.add(
            ApiKey(
                id="key_new",
                tenant_id="ten_a",
                name="n",
                prefix="p",
                key_hash="h" * 64,
                role="viewer",
            )
        )
    page = await API_KEY_READS.page(db.driver, "ten_a")
    assert sorted(r.id for r in page.items) == ["key_new", "key_ten_a_000"]


async def test_json_columns_decode_as_the_orm_does(db: Database) -> None:
    await _seed(db, "ten_a", 0)
    async with db.transaction() as session:
        session.add(
            Endpoint(
                id="ep_1",
                tenant_id="ten_a",
                url="https://example.com/hook",
                filter_types=["a.b", "c"],
                headers={"x-one": "1"},
                secrets_token="not read here",
            )
        )
    cols = Endpoint.__table__.c
    query = Query(
        select(cols.id, cols.filter_types, cols.headers, cols.channels, cols.fifo).where(
            cols.tenant_id == bindparam("tenant_id")
        )
    )
    [row] = await db.driver.all(query, tenant_id="ten_a")
    assert tuple(row) == ("ep_1", ["a.b", "c"], {"x-one": "1"}, None, False)
    assert row.headers == {"x-one": "1"}
    assert await db.driver.all(query, tenant_id="ten_b") == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_busy_falls_back_to_the_engine_and_waits(db: Database) -> None:
    """A connection holding SQLite's exclusive lock blocks every reader, even in WAL mode:
    the loop-thread read must not wait (timeout 0); the fallback waits on a worker thread.
    The lock can only be taken while no other connection has the file open, so the database
    is closed first and the read goes through a fresh one."""
    await _seed(db, "ten_a", 2)
    await API_KEY_READS.page(db.driver, "ten_a")
    await db.dispose()
    path = db.engine.url.database
    assert path
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("UPDATE api_keys SET name = name")
        locked.set()
        release.wait(10)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        asyncio.get_running_loop().call_later(0.3, release.set)
        started = asyncio.get_running_loop().time()
        fresh = Database(str(db.engine.url))
        try:
            page = await API_KEY_READS.page(fresh.driver, "ten_a")
        finally:
            await fresh.dispose()
        waited = asyncio.get_running_loop().time() - started
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 10)
    assert len(page.items) == 2
    assert waited >= 0.2  # it waited for the lock instead of failing


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_postgres_reads_survive_terminated_backends(
    db: Database, postgres_admin_url: str
) -> None:
    await _seed(db, "ten_a", 2)

    async def reads() -> list[int]:
        pages = await asyncio.gather(*(API_KEY_READS.page(db.driver, "ten_a") for _ in range(5)))
        return [len(p.items) for p in pages]

    assert await reads() == [2] * 5  # the pool now holds several connections
    admin = await asyncpg.connect(postgres_admin_url)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            db.engine.url.database,
        )
    finally:
        await admin.close()
    # Every pooled connection is dead; concurrent reads each retry once on a fresh one.
    assert await reads() == [2] * 5
    assert await reads() == [2] * 5


@pytest.fixture
async def small_pg(settings_kwargs: dict[str, Any]) -> AsyncIterator[Database]:
    """PostgreSQL with room for two reads at once."""
    url = Settings(**settings_kwargs).database_url
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: the SQLite reader has no connections to lend")
    database = Database(url, pool_size=2)
    try:
        yield database
    finally:
        await database.dispose()


async def _one_key_read_once(db: Database) -> _KeptConnections:
    """Tenant `ten_a` with one key, read once, so the reader holds a connection."""
    await _seed(db, "ten_a", 1)
    await API_KEY_READS.page(db.driver, "ten_a")
    assert db.driver._kept is not None
    return db.driver._kept


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_reads_beyond_the_pool_size_wait_for_a_connection(small_pg: Database) -> None:
    await _seed(small_pg, "ten_a", 3)
    pages = await asyncio.gather(*(API_KEY_READS.page(small_pg.driver, "ten_a") for _ in range(20)))
    assert [len(p.items) for p in pages] == [3] * 20
    kept = small_pg.driver._kept
    assert kept is not None
    assert kept.pool.get_size() <= 2


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_failed_statement_leaves_its_connection_usable(small_pg: Database) -> None:
    kept = await _one_key_read_once(small_pg)
    with pytest.raises(asyncpg.DivisionByZeroError):
        await kept.fetch("SELECT 1 / $1::int", (0,))
    assert await kept.fetch("SELECT 6 / $1::int AS x", (2,)) == [(3,)]
    assert len((await API_KEY_READS.page(small_pg.driver, "ten_a")).items) == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_read_cancelled_mid_query_hands_back_its_connection(small_pg: Database) -> None:
    """The cancelled read's connection goes back to asyncpg's pool (which cancels the query
    on the server); the next reads, more than the pool holds, still all get a connection."""
    kept = await _one_key_read_once(small_pg)
    slow = [asyncio.create_task(kept.fetch("SELECT pg_sleep(5)", ())) for _ in range(2)]
    await asyncio.sleep(0.2)  # both connections are busy sleeping
    waiting = asyncio.create_task(API_KEY_READS.page(small_pg.driver, "ten_a"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    for task in slow:
        task.cancel()
    page = await asyncio.wait_for(waiting, 3)
    assert len(page.items) == 1
    pages = await asyncio.gather(*(API_KEY_READS.page(small_pg.driver, "ten_a") for _ in range(5)))
    assert [len(p.items) for p in pages] == [1] * 5


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_close_ends_reads_waiting_for_a_connection(small_pg: Database) -> None:
    kept = await _one_key_read_once(small_pg)
    slow = [asyncio.create_task(kept.fetch("SELECT pg_sleep(0.3)", ())) for _ in range(2)]
    await asyncio.sleep(0.1)
    waiting = asyncio.create_task(API_KEY_READS.page(small_pg.driver, "ten_a"))
    await asyncio.sleep(0.05)
    await small_pg.driver.close(timeout_s=5)
    with pytest.raises(DatabaseUnavailable):
        await waiting
    assert [len(r) for r in await asyncio.gather(*slow)] == [1, 1]  # reads in flight finish


async def test_an_unreachable_postgres_is_database_unavailable() -> None:
    """Nothing listens on port 1: the first read's pool cannot connect."""
    db = Database("postgresql+asyncpg://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(DatabaseUnavailable):
            await API_KEY_READS.page(db.driver, "ten_a")
    finally:
        await db.dispose()


def _typed(row: Any, columns: list[str]) -> list[tuple[Any, type]]:
    return [(getattr(row, c), type(getattr(row, c))) for c in columns]


async def test_users_match_the_orm_in_value_and_type(db: Database) -> None:
    """`==` cannot tell True from 1 or a naive from an aware datetime; types are compared."""
    await _seed(db, "ten_a", 0)
    async with db.transaction() as session:
        for i, active in enumerate((True, False)):
            session.add(
                User(
                    id=f"usr_{i}",
                    tenant_id="ten_a",
                    email=f"u{i}@example.com",
                    password_hash="x",
                    role="viewer",
                    is_active=active,
                    last_login_at=utcnow() if active else None,
                )
            )
    columns = [c.key for c in User.__table__.c if c.key != "password_hash"]
    fast = await USER_READS.page(db.driver, "ten_a")
    async with db.reads() as session:
        orm = await UserRepository(session, "ten_a").page()
    assert [_typed(r, columns) for r in fast.items] == [_typed(r, columns) for r in orm.items]
    assert not hasattr(fast.items[0], "password_hash")  # never read


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.asyncpg.dialect()])
def test_every_prebuilt_read_compiles_for_both_databases(dialect: Any) -> None:
    assert TenantReads.registry, "no TenantReads registered"
    for reads in TenantReads.registry:
        for query in reads.queries():
            assert query.compiled(dialect).sql.startswith("SELECT")


def test_a_column_the_driver_cannot_decode_is_refused_when_compiled() -> None:
    table = Table(
        "priced",
        MetaData(),
        Column("id", String),
        Column("tenant_id", String),
        Column("p", Numeric),
    )
    with pytest.raises(TypeError, match="cannot be read on the driver"):
        TenantReads(table).queries()[0].compiled(postgresql.asyncpg.dialect())
    TenantReads.registry.pop()  # not one of the application's


def test_excluding_an_unknown_column_is_an_error() -> None:
    with pytest.raises(ValueError, match="no such columns"):
        TenantReads(ApiKey.__table__, exclude={"key_hsah"})


async def test_reads_after_close_are_unavailable_and_open_nothing(db: Database) -> None:
    await _seed(db, "ten_a", 1)
    assert len((await API_KEY_READS.page(db.driver, "ten_a")).items) == 1
    await db.driver.close()
    with pytest.raises(DatabaseUnavailable):
        await API_KEY_READS.page(db.driver, "ten_a")
    assert db.driver._kept is None
    assert db.driver._sqlite_conns == []


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_connections_idle_past_the_idle_time_go_back_to_the_pool(small_pg: Database) -> None:
    kept = await _one_key_read_once(small_pg)
    kept._idle_s = 0.2
    # Two reads at once need two connections; afterwards one of them is surplus.
    await asyncio.gather(*(kept.fetch("SELECT pg_sleep(0.05)", ()) for _ in range(2)))
    assert len(kept._free) == 2
    deadline = asyncio.get_running_loop().time() + 5
    while len(kept._free) > 1:
        assert asyncio.get_running_loop().time() < deadline, "the idle connection stayed"
        await asyncio.sleep(0.05)
    assert kept._lent == 1
    assert len((await API_KEY_READS.page(small_pg.driver, "ten_a")).items) == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_connection_in_a_read_during_expire_is_not_kept_after_it(
    small_pg: Database,
) -> None:
    kept = await _one_key_read_once(small_pg)
    reading = asyncio.create_task(kept.fetch("SELECT pg_backend_pid() AS pid, pg_sleep(0.3)", ()))
    await asyncio.sleep(0.1)
    await kept.expire()
    old_pid = (await reading)[0]["pid"]
    assert kept._free == collections.deque()  # it went back to the pool, which renews it
    new_pid = (await kept.fetch("SELECT pg_backend_pid() AS pid", ()))[0]["pid"]
    assert new_pid != old_pid
