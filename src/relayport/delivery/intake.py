"""Taking in `POST /v1/messages`: concurrent requests' messages are stored in one transaction
(group commit) and published to the broker straight after it commits.

The storing itself (idempotency, schemas, fan-out) is `messages.store_messages`; this module
batches the calls and announces what they stored. A message's outbox row is written due only
`DIRECT_PUBLISH_GRACE_S` later: the worker marks it sent when it claims the deliveries, and if
the direct publish is lost (a broker error, the process dying) the outbox relay sends it then.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.db import utcnow
from relayport.core.groupcommit import GroupCommit, sqlite_write_lock
from relayport.core.platform import Platform
from relayport.delivery import handoff
from relayport.delivery.catalog import catalog_of
from relayport.delivery.messages import QUEUE, Accepted, NewMessage, store_messages

log = logging.getLogger("relayport.delivery")

_WRITER_KEY = "delivery.message_writer"
_PUBLISHING_KEY = "delivery.publishing"
# How long a message's outbox row waits for its direct publish before the relay sends it.
DIRECT_PUBLISH_GRACE_S = 10.0
MAX_BATCH = 256
BATCH_CONCURRENCY = 4  # PostgreSQL: batches written at once by one process


def writer(platform: Platform) -> GroupCommit[NewMessage, Accepted]:
    """The process's group committer for new messages (made on first use)."""
    found = platform.extras.get(_WRITER_KEY)
    if found is None:
        ttl = platform.settings.delivery.idempotency_ttl_s
        cache = catalog_of(platform)
        sqlite = platform.db.dialect == "sqlite"

        async def write(session: AsyncSession, items: Sequence[NewMessage]) -> list[Any]:
            claim_until = None
            if handoff.can_hand_off(platform):
                lease = dt.timedelta(seconds=platform.settings.delivery.lease_s)
                claim_until = utcnow() + lease
            results = await store_messages(
                session,
                items,
                idempotency_ttl_s=ttl,
                publish_grace_s=DIRECT_PUBLISH_GRACE_S,
                catalog=cache,
                claim_until=claim_until,
            )
            if claim_until is None:
                return results
            jobs = await handoff.handoff_jobs(
                platform, session, [r for r in results if isinstance(r, Accepted)]
            )
            return [
                replace(r, jobs=jobs[r.message.id])
                if isinstance(r, Accepted) and r.message.id in jobs and r.created
                else r
                for r in results
            ]

        found = platform.extras[_WRITER_KEY] = GroupCommit(
            platform.db,
            write,
            name="delivery.messages",
            max_items=MAX_BATCH,
            max_wait_s=0,  # batches form while the previous one is being written
            # SQLite has one writer: concurrent batches would only wait on its lock.
            concurrency=1 if sqlite else BATCH_CONCURRENCY,
            lock=sqlite_write_lock(platform),
            on_commit=lambda results: publish_soon(platform, results),
        )
    assert isinstance(found, GroupCommit)
    return found


def publish_soon(platform: Platform, results: Sequence[Accepted | Exception]) -> None:
    """Announce a committed batch's new messages to the broker now, from this process,
    instead of waiting for the outbox relay's poll: the relay would add its poll interval and
    a transaction to every message's latency. Their outbox rows stay due only after
    `DIRECT_PUBLISH_GRACE_S`, and the worker marks them sent when it claims the deliveries;
    if this publish fails (or the process dies first) the relay publishes them then."""
    refs = []
    for r in results:
        if not isinstance(r, Accepted) or not r.created or r.announcement is None:
            continue
        if r.jobs:
            handoff.hand_off(platform, r.jobs)  # claimed at storing: this process sends them
        else:
            refs.append((r.message.id, r.announcement))
    if not refs:
        return
    tasks: set[asyncio.Task[None]] = platform.extras.setdefault(_PUBLISHING_KEY, set())
    # In the background: the in-process broker's publish returns only once a handler has
    # settled the message, and no request waits for that.
    task = asyncio.get_running_loop().create_task(_publish(platform, refs))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _publish(platform: Platform, refs: Sequence[tuple[str, str]]) -> None:
    outcomes = await asyncio.gather(
        *(
            platform.broker.publish(QUEUE, message_id.encode(), message_id=announcement)
            for message_id, announcement in refs
        ),
        return_exceptions=True,
    )
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        log.warning(
            "direct publish failed; the outbox relay sends these messages after its grace",
            extra={
                "event": "delivery.publish_failed",
                "count": len(failed),
                "error": repr(failed[0])[:300],
            },
        )


async def accept(platform: Platform, item: NewMessage) -> Accepted:
    """Store a message with its deliveries and outbox row, grouped into one transaction with
    the messages other requests are storing at the same moment; returns once committed."""
    return await writer(platform).submit(item)
