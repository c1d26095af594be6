"""Ingest's use of the shared group commit (`core.groupcommit`): the raw asyncpg connection
of its one-statement writes, and the GC freeze at its first unit of work.

A caller whose task is cancelled does not cancel its batch's write, so its row may still
commit; that is safe for ingest because the provider's retry is then a duplicate.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from sqlalchemy.util import greenlet_spawn

from relayport.core import gcpolicy
from relayport.core.db import Database
from relayport.core.platform import Platform


def freeze_startup_objects(platform: Platform) -> None:
    """At the first delivery or job in a process, freeze what exists by then (see
    core.gcpolicy): the objects built lazily by the first unit of work included."""
    if platform.settings.gc_freeze:
        gcpolicy.freeze_once("ingest")


@contextlib.asynccontextmanager
async def raw_connection(db: Database) -> AsyncIterator[Any]:
    """A pooled connection's asyncpg connection, outside any transaction (each statement
    commits on its own), for the hot paths' one-statement writes on PostgreSQL.

    SQLAlchemy does not see errors raised on the raw connection: one that is lost (or left
    mid-statement by a cancellation) is invalidated here, so it does not go back to the pool.
    """
    # The pool's connection itself, without the Connection/AsyncConnection wrappers around it:
    # measured, checking one out and in that way cost ~165 us of CPU per batch, this way ~75 us.
    fairy = await db.engine.raw_connection()
    try:
        yield fairy.driver_connection
    except BaseException as exc:
        if not isinstance(exc, asyncpg.PostgresError):
            # Closing the adapted connection awaits, which SQLAlchemy does inside a greenlet.
            await greenlet_spawn(fairy.invalidate)
        raise
    finally:
        # Back to the pool; its reset is a no-op, as no transaction was ever begun on it.
        fairy.close()
