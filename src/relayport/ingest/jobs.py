"""Running jobs: claim one, run its source's handler on the CloudEvent, record the outcome; and
the scheduler's sweep that sends due retries and jobs of dead workers back through the broker.

Each step is a short transaction, shared with the claims or outcomes of other jobs running at
the same time (`bookkeeping`), and none is held while a handler runs. Everything is safe to
run twice: a claim is one guarded UPDATE, and an outcome is recorded only by the worker that
still holds the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from time import perf_counter
from typing import Any, Literal

from relayport.core.db import utcnow
from relayport.core.groupcommit import sqlite_write_lock
from relayport.core.outbox import enqueue
from relayport.core.platform import Platform
from relayport.ingest import bookkeeping, handlers, repository
from relayport.ingest.metrics import DLQ_MESSAGES, JOB_DURATION, JOB_RETRIES, JOBS_PROCESSED
from relayport.ingest.service import QUEUE, cloudevent

log = logging.getLogger("relayport.ingest")

MAX_ERROR_CHARS = 1000
DISPATCH_BATCH = 500

Outcome = Literal["succeeded", "retrying", "dead"]


def backoff_s(
    attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Delay before the attempt after `attempt` failed ones: exponential with full jitter.

    Full jitter (uniform between 0 and the exponential ceiling) spreads the retries of events
    that failed together, so a recovering downstream is not hit by all of them at once.
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempt - 1, 0), 60))
    return (rng or random).uniform(0, ceiling)


async def run_job(platform: Platform, job_id: str) -> Outcome | None:
    """Run one attempt of a job, if it is due and free; None when there was nothing to do."""
    settings = platform.settings.ingest
    claim = await bookkeeping.claims(platform).submit(job_id)
    if claim is None:
        # A duplicate message, a job another worker runs, one not due yet, or one deleted with
        # its source.
        return None
    attempt = claim.attempt
    error = await _run_handler(
        platform, claim.event.handler, cloudevent(claim.event), settings.lease_s
    )
    done = utcnow()
    # A finished job's next_attempt_at says when it finished, not a lease end in the future.
    values: dict[str, Any] = {"locked_until": None, "updated_at": done, "next_attempt_at": done}
    outcome: Outcome
    if error is None:
        outcome = "succeeded"
        values |= {"status": outcome, "finished_at": done, "last_error": None}
    elif attempt >= claim.max_attempts:
        outcome = "dead"
        values |= {"status": outcome, "finished_at": done, "last_error": error}
    else:
        outcome = "retrying"
        delay = backoff_s(attempt, base_s=settings.retry_base_s, cap_s=settings.retry_cap_s)
        values |= {
            "status": outcome,
            "next_attempt_at": done + dt.timedelta(seconds=delay),
            "last_error": error,
        }
    recorded = await bookkeeping.outcomes(platform).submit(
        bookkeeping.Outcome(job_id, attempt, outcome, values)
    )
    if not recorded:
        # Our lease ran out and the scheduler gave the job to another worker: its word counts.
        log.warning(
            "job outcome dropped: lease lost",
            extra={"event": "ingest.job_lease_lost", "job_id": job_id, "attempt": attempt},
        )
        return None
    JOBS_PROCESSED.labels(outcome).inc()
    if outcome == "retrying":
        JOB_RETRIES.inc()
    elif outcome == "dead":
        DLQ_MESSAGES.inc()
    if error is not None:
        log.warning(
            "job attempt failed",
            extra={
                "event": "ingest.job_failed",
                "job_id": job_id,
                "attempt": attempt,
                "outcome": outcome,
                "error": error,
            },
        )
    return outcome


async def _run_handler(
    platform: Platform, name: str, event: dict[str, Any], timeout_s: float
) -> str | None:
    """The handler's error as text, or None when it succeeded."""
    handler = handlers.get(name)
    if handler is None:
        return f"no handler named {name!r} in this worker"
    started = perf_counter()
    try:
        # Past its lease another worker may start the job: an attempt may not outlive it.
        async with asyncio.timeout(timeout_s):
            await handler(platform, event)
    except TimeoutError:
        return f"handler {name!r} ran past the {timeout_s:g} s lease"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    finally:
        JOB_DURATION.observe(perf_counter() - started)
    return None


async def dispatch_due(platform: Platform, *, limit: int = DISPATCH_BATCH) -> int:
    """Queue again, through the outbox, the jobs the broker should carry now: due retries,
    jobs whose worker's lease expired, and queued jobs whose message was lost. Jobs whose lease
    expired on their last attempt are dead-lettered. Returns how many were queued."""
    settings = platform.settings.ingest
    now = utcnow()
    stuck_before = now - dt.timedelta(seconds=settings.requeue_stuck_after_s)
    async with (
        sqlite_write_lock(platform) or contextlib.nullcontext(),
        platform.db.transaction() as session,
    ):
        ids = await repository.dispatchable(
            session, now=now, stuck_before=stuck_before, limit=limit
        )
        if not ids:
            return 0
        dead = await repository.bury_exhausted(session, ids, now=now)
        moved = await repository.requeue(session, ids, now=now, stuck_before=stuck_before)
        for job_id, tenant_id in moved:
            enqueue(
                session,
                topic=QUEUE,
                payload=job_id.encode(),
                message_id=job_id,
                tenant_id=tenant_id,
            )
    if dead:
        JOBS_PROCESSED.labels("dead").inc(dead)
        DLQ_MESSAGES.inc(dead)
    if moved:
        log.info(
            "jobs dispatched again",
            extra={"event": "ingest.jobs_dispatched", "count": len(moved), "dead": dead},
        )
    return len(moved)
