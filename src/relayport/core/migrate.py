"""Schema migrations (Alembic), safe to start from several instances at once."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from relayport.core.db import Database

log = logging.getLogger("relayport.migrate")

# Any constant works; it only has to be the same in every instance.
_ADVISORY_LOCK_ID = 0x52504D47  # "RPMG"
_SCRIPTS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_SCRIPTS))
    return cfg


@functools.cache
def head_revision() -> str | None:
    # Parsing every script is milliseconds of blocking work; the scripts never change while
    # the process runs, and /readyz asks on every probe.
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _upgrade(conn: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


async def current_revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(_current)


async def is_current(db: Database) -> bool:
    return await current_revision(db) == head_revision()


async def upgrade(db: Database, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema to `revision`; returns (before, after).

    On PostgreSQL a session advisory lock serializes instances that start together: the
    first migrates, the others wait and then find nothing to do.
    """
    async with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
            await conn.commit()
        try:
            before = await conn.run_sync(_current)
            await conn.run_sync(_upgrade, revision)
            await conn.commit()
            after = await conn.run_sync(_current)
        finally:
            if db.dialect == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_unlock(:id)"), {"id": _ADVISORY_LOCK_ID}
                )
                await conn.commit()
    if before != after:
        log.info(
            "migrated the database",
            extra={"event": "db.migrated", "from": before, "to": after},
        )
    return before, after
