"""The two session factories: request transactions, and autocommit reads for GET routes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from relayport.core.db import Database
from relayport.settings import Settings


async def test_read_sessions_run_each_statement_on_its_own(
    backend: str, settings_kwargs: dict[str, Any]
) -> None:
    db = Database(Settings(**settings_kwargs).database_url)
    try:
        if backend == "postgres":
            # Outside a transaction every statement gets its own transaction id.
            query = text("SELECT txid_current()")
            async with db.reads() as session:
                first = (await session.execute(query)).scalar_one()
                second = (await session.execute(query)).scalar_one()
            assert second > first
            async with db.sessions() as session:
                first = (await session.execute(query)).scalar_one()
                second = (await session.execute(query)).scalar_one()
            assert second == first
        else:
            async with db.reads() as session:
                raw = await (await session.connection()).get_raw_connection()
                assert raw.driver_connection.isolation_level is None  # type: ignore[union-attr]
            async with db.sessions() as session:
                raw = await (await session.connection()).get_raw_connection()
                assert raw.driver_connection.isolation_level is not None  # type: ignore[union-attr]
    finally:
        await db.dispose()
