"""Background work of outbound webhooks, registered with `relayport.worker`: the
`delivery.send` consumer and the scheduler tick that sends due retries again."""

from __future__ import annotations

import datetime as dt
import logging

from relayport.core import gcpolicy
from relayport.core.broker import Message
from relayport.core.db import utcnow
from relayport.core.platform import Platform
from relayport.delivery import handoff, health, messages, repository, sender
from relayport.delivery.messages import QUEUE
from relayport.delivery.transport import close_transport

log = logging.getLogger("relayport.delivery")

DISPATCH_BATCH = 500

__all__ = ["QUEUE", "close", "handle", "tick"]


async def handle(platform: Platform, message: Message) -> None:
    """Consume one `delivery.send` message: a message id (all its due deliveries) or a
    delivery id."""
    ref = message.body.decode("ascii", "replace")[:64]
    if platform.settings.gc_freeze:
        # `relayport worker` has no app lifespan to freeze its startup objects: without
        # this, a full collection walks all of them (a 60-70 ms pause in the 200 msg/s row).
        gcpolicy.freeze_once("delivery")
    try:
        # Claims and outcomes are written in batches with the other refs handled at the same
        # moment; this returns once this ref's own deliveries are recorded.
        await sender.send_ref(platform, ref, message.message_id)
    except Exception:
        # The database holds the deliveries, not the broker message: acking loses nothing,
        # since the scheduler sends them round again once their lease expires.
        log.exception("delivery handling failed", extra={"event": "delivery.error", "ref": ref})


async def tick(platform: Platform) -> None:
    """One scheduler round: make due retries, expired leases and long-queued deliveries
    claimable again and announce them through the outbox."""
    settings = platform.settings.delivery
    now = utcnow()
    stuck_before = now - dt.timedelta(seconds=settings.requeue_stuck_after_s)
    async with platform.db.transaction() as session:
        ids = await repository.dispatchable(
            session, now=now, stuck_before=stuck_before, limit=DISPATCH_BATCH
        )
        if not ids:
            return
        moved = await repository.requeue(session, ids, now=now, stuck_before=stuck_before)
        messages.enqueue_deliveries(session, moved)
    if moved:
        health.wake(platform)
        log.info(
            "deliveries dispatched again",
            extra={"event": "delivery.dispatched", "count": len(moved)},
        )


async def close(platform: Platform) -> None:
    await handoff.drain(platform, platform.settings.shutdown_timeout_s)
    sender.forget(platform)
    await close_transport(platform)
