"""Background work of inbound webhooks, registered with `relayport.worker`: the `ingest.jobs`
consumer and the scheduler tick."""

from __future__ import annotations

import logging

from relayport.core.broker import Message
from relayport.core.outbox import pending_count
from relayport.core.platform import Platform
from relayport.ingest import jobs
from relayport.ingest.metrics import OUTBOX_PENDING
from relayport.ingest.service import QUEUE

log = logging.getLogger("relayport.ingest")

__all__ = ["QUEUE", "handle_job", "tick"]


async def handle_job(platform: Platform, message: Message) -> None:
    """Consume one `ingest.jobs` message (its body is the job id)."""
    job_id = message.body.decode("ascii", "replace")
    try:
        await jobs.run_job(platform, job_id)
    except Exception:
        # The database, not the message, holds the job: acking here loses nothing, since the
        # scheduler sends the job round again once its lease expires. Raising would only park
        # the message in the broker's dead-letter queue, where nothing reads it.
        log.exception(
            "job handling failed", extra={"event": "ingest.job_error", "job_id": job_id[:64]}
        )


async def tick(platform: Platform) -> None:
    """One scheduler round: re-dispatch due jobs, refresh the `outbox_pending` gauge."""
    await jobs.dispatch_due(platform)
    OUTBOX_PENDING.set(await pending_count(platform.db))
