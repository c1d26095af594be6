"""Master-key rotation: re-wrap every stored data key under the active key, without downtime.

Capabilities register, at import time, each model column that holds `KeyRing` tokens::

    register_encrypted_column(WebhookSource.secret)

After the new key is added to the ring and made active, `rewrap_all` walks each registered table in
primary-key order (keyset pagination), one short transaction per batch, so writers keep working.
Each UPDATE is conditional on the value it read: a writer who changed the row meanwhile wins and
the row is counted as skipped. Tokens are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Column, CursorResult, String, TableClause, inspect, select, update
from sqlalchemy.orm import InstrumentedAttribute

from relayport.core.crypto import DecryptionError, KeyRing
from relayport.core.db import Database

log = logging.getLogger("relayport.crypto")

MAX_FAILED_IDS = 100


@dataclass(frozen=True)
class EncryptedColumn:
    """One registered column: its table, string primary key `id` and default batch size."""

    table: TableClause
    pk: Column[Any]
    column: Column[Any]
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column.name}"


# Module-level registry, filled by capabilities at import time.
ENCRYPTED_COLUMNS: list[EncryptedColumn] = []


def _resolve(column: InstrumentedAttribute[str | None], batch_size: int) -> EncryptedColumn:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    mapper = inspect(column.class_)
    pks = mapper.primary_key
    if len(pks) != 1 or pks[0].key != "id" or not isinstance(pks[0].type, String):
        raise ValueError(f"{mapper.class_.__name__} needs a single string primary key `id`")
    col = mapper.columns[column.key]
    if not isinstance(col.type, String):
        raise ValueError(f"{mapper.class_.__name__}.{column.key} is not a string column")
    return EncryptedColumn(table=col.table, pk=pks[0], column=col, batch_size=batch_size)


def register_encrypted_column(
    column: InstrumentedAttribute[str | None], *, batch_size: int = 500
) -> EncryptedColumn:
    """Declare a column of KeyRing tokens; registering `table.column` again replaces it."""
    entry = _resolve(column, batch_size)
    unregister_encrypted_column(column)
    ENCRYPTED_COLUMNS.append(entry)
    return entry


def unregister_encrypted_column(column: InstrumentedAttribute[str | None]) -> None:
    name = _resolve(column, 1).name
    ENCRYPTED_COLUMNS[:] = [e for e in ENCRYPTED_COLUMNS if e.name != name]


@dataclass
class ColumnRewrap:
    """Counts for one column; `failed_ids` keeps the first 100 ids of tokens that cannot open."""

    scanned: int = 0
    rewrapped: int = 0
    skipped: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)


@dataclass
class RewrapReport:
    columns: dict[str, ColumnRewrap] = field(default_factory=dict)

    @property
    def rewrapped(self) -> int:
        return sum(c.rewrapped for c in self.columns.values())

    @property
    def skipped(self) -> int:
        return sum(c.skipped for c in self.columns.values())

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.columns.values())


async def _batches(
    db: Database, entry: EncryptedColumn, size: int
) -> AsyncIterator[Sequence[tuple[str, str]]]:
    """(id, token) pages in primary-key order; each read in its own short session."""
    last: str | None = None
    while True:
        query = select(entry.pk, entry.column).where(entry.column.is_not(None))
        if last is not None:
            query = query.where(entry.pk > last)
        async with db.sessions() as session:
            rows = (await session.execute(query.order_by(entry.pk).limit(size))).all()
        if not rows:
            return
        yield rows
        last = rows[-1][0]


async def _rewrap_column(
    db: Database, keyring: KeyRing, entry: EncryptedColumn, size: int
) -> ColumnRewrap:
    counts = ColumnRewrap()
    async for rows in _batches(db, entry, size):
        counts.scanned += len(rows)
        changes: list[tuple[str, str, str]] = []
        # Crypto runs outside any transaction: the write lock is held only for the UPDATEs.
        for row_id, token in rows:
            try:
                if keyring.needs_rewrap(token):
                    changes.append((row_id, token, keyring.rewrap(token)))
            except DecryptionError:
                counts.failed += 1
                if len(counts.failed_ids) < MAX_FAILED_IDS:
                    counts.failed_ids.append(row_id)
        if not changes:
            continue
        async with db.transaction() as session:
            for row_id, old, new in changes:
                stmt = (
                    update(entry.table)
                    .where(entry.pk == row_id, entry.column == old)
                    .values({entry.column: new})
                )
                result = cast("CursorResult[Any]", await session.execute(stmt))
                if result.rowcount == 1:
                    counts.rewrapped += 1
                else:  # a concurrent writer changed (or deleted) the row: its value wins
                    counts.skipped += 1
    return counts


async def rewrap_all(
    db: Database, keyring: KeyRing, *, batch_size: int | None = None
) -> RewrapReport:
    """Re-wrap every registered token that is not under `keyring.active_kid`; safe to rerun."""
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = RewrapReport()
    for entry in list(ENCRYPTED_COLUMNS):
        counts = await _rewrap_column(db, keyring, entry, batch_size or entry.batch_size)
        report.columns[entry.name] = counts
        log.info(
            "re-wrapped %s: %d of %d tokens, %d skipped, %d failed",
            entry.name,
            counts.rewrapped,
            counts.scanned,
            counts.skipped,
            counts.failed,
            extra={
                "event": "crypto.rewrap",
                "column": entry.name,
                "active_kid": keyring.active_kid,
                "scanned": counts.scanned,
                "rewrapped": counts.rewrapped,
                "skipped": counts.skipped,
                "failed": counts.failed,
                "failed_ids": list(counts.failed_ids),
            },
        )
    return report


async def pending_rewrap(db: Database, keyring: KeyRing) -> dict[str, int]:
    """Per `table.column`, tokens not yet under the active key (unreadable ones included)."""
    pending: dict[str, int] = {}
    for entry in list(ENCRYPTED_COLUMNS):
        count = 0
        async for rows in _batches(db, entry, max(entry.batch_size, 1000)):
            for _, token in rows:
                try:
                    count += keyring.needs_rewrap(token)
                except DecryptionError:
                    count += 1
        pending[entry.name] = count
    return pending
