"""Alembic environment: runs on the connection `relayport.core.migrate` hands it."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context

import relayport.models  # noqa: F401  (registers every table on Base.metadata)
from relayport.core.db import Base, UTCDateTime


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # Migrations must not import application types: UTCDateTime is a timestamptz on disk.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `relayport migrate`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
