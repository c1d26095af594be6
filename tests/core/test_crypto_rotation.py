from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
from sqlalchemy import Integer, String, event, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from relayport.core.crypto import KeyRing
from relayport.core.crypto_rotation import (
    ENCRYPTED_COLUMNS,
    ColumnRewrap,
    EncryptedColumn,
    pending_rewrap,
    register_encrypted_column,
    rewrap_all,
    unregister_encrypted_column,
)
from relayport.core.db import Database
from tests.fixtures.services import run_async

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
K9 = bytes(range(200, 232))
COLUMN = "rotation_secrets.secret"


class RotationBase(DeclarativeBase):
    """Test-only metadata: keeps these tables out of relayport's Base."""


class Secret(RotationBase):
    __tablename__ = "rotation_secrets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret: Mapped[str | None] = mapped_column(String)


class OtherBase(DeclarativeBase):
    pass


class IntKeyed(OtherBase):
    __tablename__ = "int_keyed"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret: Mapped[str | None] = mapped_column(String)


def ring(*kids: str, active: str | None = None) -> KeyRing:
    keys = {"k1": K1, "k2": K2, "k9": K9}
    return KeyRing({kid: keys[kid] for kid in kids}, active or kids[-1])


def row_id(i: int) -> str:
    return f"row{i:05d}"


@pytest.fixture(autouse=True)
def registry() -> Iterator[EncryptedColumn]:
    saved = list(ENCRYPTED_COLUMNS)
    ENCRYPTED_COLUMNS.clear()  # capabilities' own columns have no table in this test's database
    entry = register_encrypted_column(Secret.secret)
    try:
        yield entry
    finally:
        unregister_encrypted_column(Secret.secret)
        assert ENCRYPTED_COLUMNS == []
        ENCRYPTED_COLUMNS[:] = saved


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'rotation.db'}"
    else:
        url = str(request.getfixturevalue("postgres_database_url"))
    database = Database(url, pool_size=4)
    async with database.engine.begin() as conn:  # the PostgreSQL database is per module
        await conn.run_sync(RotationBase.metadata.drop_all)
        await conn.run_sync(RotationBase.metadata.create_all)
    yield database
    await database.dispose()


async def seed(db: Database, values: Mapping[str, str | None]) -> None:
    async with db.transaction() as session:
        await session.execute(insert(Secret), [{"id": k, "secret": v} for k, v in values.items()])


async def stored(db: Database) -> dict[str, str | None]:
    async with db.sessions() as session:
        rows = (await session.execute(select(Secret.id, Secret.secret))).all()
    return dict(rows)


def plaintext(i: int) -> bytes:
    return f"whsec_{i}".encode()


async def test_rotation_rewraps_every_row_batch_by_batch(db: Database) -> None:
    old = ring("k1")
    await seed(
        db, {row_id(i): old.encrypt(plaintext(i), aad=row_id(i).encode()) for i in range(1234)}
    )
    before = await stored(db)
    rotated = ring("k1", "k2", active="k2")
    assert await pending_rewrap(db, old) == {COLUMN: 0}
    assert await pending_rewrap(db, rotated) == {COLUMN: 1234}

    commits: list[object] = []

    def on_commit(conn: object) -> None:
        commits.append(conn)

    event.listen(db.engine.sync_engine, "commit", on_commit)
    report = await rewrap_all(db, rotated, batch_size=100)
    event.remove(db.engine.sync_engine, "commit", on_commit)

    assert report.columns == {COLUMN: ColumnRewrap(scanned=1234, rewrapped=1234)}
    assert len(commits) == 13  # one short transaction per batch of 100, never one long one
    after = await stored(db)
    only_k2 = ring("k2")
    for i in range(1234):
        token = after[row_id(i)]
        assert token is not None
        assert token.startswith("v1.k2.")
        assert token.split(".")[3] == str(before[row_id(i)]).split(".")[3]  # data kept verbatim
        assert only_k2.decrypt(token, aad=row_id(i).encode()) == plaintext(i)
    assert await pending_rewrap(db, rotated) == {COLUMN: 0}

    again = await rewrap_all(db, rotated, batch_size=100)
    assert again.columns[COLUMN] == ColumnRewrap(scanned=1234)
    assert await stored(db) == after


class WriterRing(KeyRing):
    """Rewrapping `target` first lets another session overwrite that row (a concurrent writer)."""

    def __init__(self, url: str, target: str, target_id: str, fresh: str) -> None:
        super().__init__({"k1": K1, "k2": K2}, "k2")
        self.url, self.target, self.target_id, self.fresh = url, target, target_id, fresh

    def rewrap(self, token: str) -> str:
        if token == self.target:
            run_async(self._write)  # another engine, another connection, committed before we go on
        return super().rewrap(token)

    async def _write(self) -> None:
        other = Database(self.url, pool_size=1)
        try:
            async with other.transaction() as session:
                stmt = update(Secret).where(Secret.id == self.target_id).values(secret=self.fresh)
                await session.execute(stmt)
        finally:
            await other.dispose()


async def test_a_concurrent_writer_wins_and_its_row_is_skipped(db: Database) -> None:
    old = ring("k1")
    await seed(
        db, {row_id(i): old.encrypt(plaintext(i), aad=row_id(i).encode()) for i in range(250)}
    )
    victim = row_id(137)
    target = (await stored(db))[victim]
    assert target is not None
    fresh = ring("k2").encrypt(b"set by the writer", aad=victim.encode())
    keyring = WriterRing(db.url, target, victim, fresh)

    report = await rewrap_all(db, keyring, batch_size=100)

    assert report.columns[COLUMN] == ColumnRewrap(scanned=250, rewrapped=249, skipped=1)
    after = await stored(db)
    assert after[victim] == fresh
    only_k2 = ring("k2")
    for i in range(250):
        expected = b"set by the writer" if row_id(i) == victim else plaintext(i)
        assert only_k2.decrypt(str(after[row_id(i)]), aad=row_id(i).encode()) == expected
    assert await pending_rewrap(db, keyring) == {COLUMN: 0}


def tamper_wrapped(token: str) -> str:
    version, kid, wrapped, data = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(wrapped + "=" * (-len(wrapped) % 4)))
    raw[20] ^= 0x01
    flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return f"{version}.{kid}.{flipped}.{data}"


async def test_unreadable_tokens_are_counted_failed_and_the_rest_rewrapped(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    old = ring("k1")
    values: dict[str, str | None] = {
        row_id(i): old.encrypt(plaintext(i), aad=row_id(i).encode()) for i in range(300)
    }
    values[row_id(50)] = "v1.k1.not-a-token"
    values[row_id(100)] = None
    values[row_id(150)] = tamper_wrapped(str(values[row_id(150)]))
    values[row_id(250)] = ring("k9").encrypt(b"lost key", aad=row_id(250).encode())
    await seed(db, values)
    rotated = ring("k1", "k2", active="k2")

    with caplog.at_level(logging.INFO, logger="relayport.crypto"):
        report = await rewrap_all(db, rotated, batch_size=64)

    bad = [row_id(50), row_id(150), row_id(250)]
    assert report.columns[COLUMN] == ColumnRewrap(
        scanned=299, rewrapped=296, failed=3, failed_ids=bad
    )
    after = await stored(db)
    assert all(after[k] == values[k] for k in [*bad, row_id(100)])  # left exactly as they were
    assert await pending_rewrap(db, rotated) == {COLUMN: 3}

    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "crypto.rewrap"]
    assert record.levelno == logging.INFO
    assert (record.column, record.scanned, record.rewrapped) == (COLUMN, 299, 296)  # type: ignore[attr-defined]
    assert (record.skipped, record.failed, record.failed_ids) == (0, 3, bad)  # type: ignore[attr-defined]
    logged = record.getMessage() + repr(record.__dict__)
    for token in [*values.values(), *after.values()]:
        if token:
            assert token.split(".")[-1] not in logged
            assert token not in logged


def test_registry_replaces_duplicates_and_rejects_non_string_keys() -> None:
    entry = register_encrypted_column(Secret.secret, batch_size=50)
    assert [e.name for e in ENCRYPTED_COLUMNS] == [COLUMN]
    assert ENCRYPTED_COLUMNS[0] is entry
    assert entry.batch_size == 50
    with pytest.raises(ValueError, match="string primary key"):
        register_encrypted_column(IntKeyed.secret)
    with pytest.raises(ValueError, match="batch_size"):
        register_encrypted_column(Secret.secret, batch_size=0)
    assert len(ENCRYPTED_COLUMNS) == 1


async def test_rewrap_all_rejects_a_bad_batch_size(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    try:
        with pytest.raises(ValueError, match="batch_size"):
            await rewrap_all(db, ring("k2"), batch_size=0)
    finally:
        await db.dispose()
