"""Background work of inbound webhooks, registered with `relayport.worker`: the `ingest.jobs`
consumer and the scheduler tick."""

from __future__ import annotations

import asyncio
import logging

from relayport.core.broker import Message
from relayport.core.outbox import pending_count
from relayport.core.platform import Platform
from relayport.ingest import jobs
from relayport.ingest.metrics import OUTBOX_PENDING
from relayport.ingest.service import QUEUE

log = logging.getLogger("relayport.ingest")

__all__ = ["QUEUE", "handle_job", "tick"]


# Jobs one worker process runs at once, across messages. Their claims and outcomes share
# statements (`bookkeeping`), so this also bounds how many one statement takes. On PostgreSQL
# at least a whole intake batch (`batch_max_rows`, 100 by default), so that a message's jobs
# are claimed and finished in one statement each rather than in slices (at 32 the worker fell
# thousands of jobs behind intake at 3,000-4,000 deliveries/s in the benchmark; at 128 it
# kept up). On SQLite the worker shares its process and the one write lock with intake, and
# more jobs at once would only take turns away from intake. Bodies of running jobs are in
# memory: at most this many per worker process.
JOB_CONCURRENCY = 128
JOB_CONCURRENCY_SQLITE = 32
# A message names the new jobs of one group commit (at most `batch_max_rows`, <= 1,000).
MAX_JOBS_PER_MESSAGE = 1000
_SLOTS_KEY = "ingest.job_slots"


def _slots(platform: Platform) -> asyncio.Semaphore:
    slots = platform.extras.get(_SLOTS_KEY)
    if slots is None:
        size = JOB_CONCURRENCY_SQLITE if platform.db.dialect == "sqlite" else JOB_CONCURRENCY
        slots = platform.extras[_SLOTS_KEY] = asyncio.Semaphore(size)
    assert isinstance(slots, asyncio.Semaphore)
    return slots


async def handle_job(platform: Platform, message: Message) -> None:
    """Consume one `ingest.jobs` message: its body is a job id, or several separated by spaces
    (the jobs of one tenant that one group commit created). They run concurrently; the message
    is done when all are."""
    job_ids = message.body.decode("ascii", "replace").split()[:MAX_JOBS_PER_MESSAGE]
    if len(job_ids) == 1:
        await _run(platform, job_ids[0])
        return
    await asyncio.gather(*(_run(platform, job_id) for job_id in dict.fromkeys(job_ids)))


async def _run(platform: Platform, job_id: str) -> None:
    try:
        async with _slots(platform):
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
