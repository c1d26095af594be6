"""Migration 0003 creates exactly the outbound-webhook tables the models declare."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from relayport.core import migrate
from relayport.core.db import Base
from relayport.core.platform import Platform


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return [
        change for change in compare_metadata(context, Base.metadata) if "delivery_" in repr(change)
    ]


async def test_migrated_schema_matches_the_delivery_models(platform: Platform) -> None:
    assert await migrate.current_revision(platform.db) == migrate.head_revision()
    async with platform.db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
