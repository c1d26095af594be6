"""Sending: claim due deliveries, sign, POST (with failover), log every attempt, schedule the
retry or declare the delivery dead. Each step is its own short transaction and none is held
while a request is in flight. Safe to run twice: a claim is one guarded UPDATE, and an outcome
is recorded only while the worker still holds the attempt.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.crypto import DecryptionError
from relayport.core.db import utcnow
from relayport.core.groupcommit import GroupCommit, sqlite_write_lock
from relayport.core.platform import Platform
from relayport.delivery import health, repository, retry, signing
from relayport.delivery.models import Endpoint, Message
from relayport.delivery.secrets import open_secrets
from relayport.delivery.transport import PostResult, Transport, transport_of

log = logging.getLogger("relayport.delivery")

Status = Literal["succeeded", "retrying", "dead"]
FINISH_WAVE_S = 0.25
OUTCOME_WAIT_S = 0.025  # how long an outcome waits for others to share its transaction
MAX_BATCH = 256
BATCH_CONCURRENCY = 2  # PostgreSQL: claim (and outcome) batches written at once per process
_CLAIMS_KEY = "delivery.claims"
_OUTCOMES_KEY = "delivery.outcomes"


@dataclass(slots=True)
class Job:
    """One claimed delivery: what its attempt needs."""

    delivery_id: str
    endpoint: Endpoint
    message: Message
    attempt: int
    schedules: TenantSchedules
    lease_until: dt.datetime
    # The outbox row to mark sent with the outcome: set when the delivery was claimed at
    # storing (see `handoff`), where no claim marked it.
    announcement: str | None = None

    async def schedule(self, platform: Platform) -> Sequence[float]:
        """The endpoint's own retry schedule, else its tenant's, else the platform's."""
        return (
            self.endpoint.retry_schedule_s
            or await self.schedules.get(self.endpoint.tenant_id)
            or platform.settings.delivery.retry_schedule_s
        )


class TenantSchedules:
    """The own retry schedules of a claim batch's tenants, read once, on first need: only a
    failed attempt needs one, so the healthy path never reads them."""

    def __init__(self, platform: Platform, tenant_ids: set[str]) -> None:
        self._platform = platform
        self._tenant_ids = tenant_ids
        self._loaded: asyncio.Future[dict[str, list[float]]] | None = None

    async def get(self, tenant_id: str) -> list[float] | None:
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(self._load())
        return (await asyncio.shield(self._loaded)).get(tenant_id)

    async def _load(self) -> dict[str, list[float]]:
        async with self._platform.db.reads() as session:
            return await repository.tenant_schedules(session, sorted(self._tenant_ids))


@dataclass(slots=True)
class Outcome:
    delivery_id: str
    endpoint: Endpoint
    message: Message
    attempt: int
    status: Status
    next_at: dt.datetime
    lease_until: dt.datetime
    error: str | None = None
    # -1 when no request was made (circuit open, rate limited, disabled): the claim's count
    # is given back, so waiting never burns the attempt budget.
    attempt_delta: int = 0
    results: list[PostResult] = field(default_factory=list)
    probe: bool = False
    gone: bool = False
    announcement: str | None = None

    @property
    def endpoint_id(self) -> str:
        return self.endpoint.id

    @property
    def sent(self) -> bool:
        return bool(self.results)

    @property
    def ok(self) -> bool:
        return bool(self.results) and self.results[-1].ok


@dataclass(slots=True)
class Gate:
    """What this worker may do with an endpoint whose circuit is not closed."""

    probe: bool
    until: dt.datetime
    used: bool = False


def _claims(platform: Platform) -> GroupCommit[tuple[str, str | None], list[Job]]:
    found = platform.extras.get(_CLAIMS_KEY)
    if found is None:

        async def write(
            session: AsyncSession, items: Sequence[tuple[str, str | None]]
        ) -> list[Any]:
            # The broker messages' outbox rows (most were published straight after the commit
            # that made them, `intake.publish_soon`) are marked sent with the claim: from
            # here on the deliveries' leases stand for them.
            announced = [a for _, a in items if a is not None]
            return await claim_batch(platform, session, [ref for ref, _ in items], announced)

        async def run(items: Sequence[tuple[str, str | None]]) -> list[Any]:
            # PostgreSQL: the claim is one statement (`repository.claim_and_load`), atomic by
            # itself, so it runs on an autocommit connection: one round trip instead of
            # BEGIN, UPDATE, SELECT, COMMIT on the path of every message.
            async with platform.db.reads() as session:
                return await write(session, items)

        found = platform.extras[_CLAIMS_KEY] = _committer(
            platform,
            write if platform.db.dialect == "sqlite" else None,
            "delivery.claims",
            run=None if platform.db.dialect == "sqlite" else run,
        )
    assert isinstance(found, GroupCommit)
    return found


def _outcomes(platform: Platform) -> GroupCommit[Outcome, bool]:
    found = platform.extras.get(_OUTCOMES_KEY)
    if found is None:

        async def write(session: AsyncSession, outcomes: Sequence[Outcome]) -> list[Any]:
            queued = await health.record(platform, transport_of(platform), session, outcomes)
            return [queued] * len(outcomes)

        # Outcomes are off the path to the receiver: they wait a little to share a
        # transaction, leaving the write lock (SQLite) and the worker's CPU to claims and
        # new messages, which are on it.
        found = platform.extras[_OUTCOMES_KEY] = _committer(
            platform, write, "delivery.outcomes", max_wait_s=OUTCOME_WAIT_S
        )
    assert isinstance(found, GroupCommit)
    return found


def _committer(
    platform: Platform, write: Any, name: str, *, run: Any = None, max_wait_s: float = 0
) -> GroupCommit[Any, Any]:
    return GroupCommit(
        platform.db,
        write,
        run=run,
        name=name,
        max_items=MAX_BATCH,
        # 0: batches form while the previous one is being written
        max_wait_s=max_wait_s,
        concurrency=1 if platform.db.dialect == "sqlite" else BATCH_CONCURRENCY,
        lock=sqlite_write_lock(platform),
    )


async def claim_batch(
    platform: Platform,
    session: AsyncSession,
    refs: Sequence[str],
    announced: Sequence[str] = (),
) -> list[list[Job]]:
    """Claim the due deliveries `refs` name (a message id: all of its deliveries; a delivery
    id: that one) and read what their sends need, in the caller's transaction: the jobs of
    each ref (none for a ref that repeats an earlier one of the batch)."""
    settings = platform.settings.delivery
    now = utcnow()
    lease_until = now + dt.timedelta(seconds=settings.lease_s)
    singles = {r for r in refs if not r.startswith("msg_")}
    wanted: dict[str, Any] = {
        "now": now,
        "lease_until": lease_until,
        "message_ids": sorted({r for r in refs if r.startswith("msg_")}),
        "delivery_ids": sorted(singles),
        "announced": announced,
    }
    rows: list[tuple[str, str, str, int, Message | None, Endpoint | None]]
    if platform.db.dialect == "postgresql":
        rows = list(await repository.claim_and_load(session, **wanted))
    else:
        claimed = await repository.claim(session, **wanted)
        if not claimed:
            return [[] for _ in refs]  # duplicates, work another worker holds, or not due yet
        messages, endpoints = await repository.load_for_send(session, [c[0] for c in claimed])
        rows = [(*c, messages.get(c[2]), endpoints.get(c[1])) for c in claimed]
    if not rows:
        return [[] for _ in refs]
    schedules = TenantSchedules(platform, {r[4].tenant_id for r in rows if r[4] is not None})
    by_ref: dict[str, list[Job]] = {}
    for delivery_id, _, message_id, attempt, message, endpoint in rows:
        if endpoint is None or message is None:
            continue  # deleted with its endpoint after the claim
        ref = delivery_id if delivery_id in singles else message_id
        by_ref.setdefault(ref, []).append(
            Job(delivery_id, endpoint, message, attempt, schedules, lease_until)
        )
    return [by_ref.pop(ref, []) for ref in refs]


async def send_ref(platform: Platform, ref: str, announcement: str | None = None) -> int:
    """Send the due deliveries one broker message names (a message id or a delivery id) and
    record their outcomes; returns how many were attempted or deferred.

    Claims and outcomes of the refs a worker handles at the same moment are written together
    (one transaction each per batch), yet each ref returns, and its broker message is acked,
    as soon as its own deliveries are recorded: a hanging endpoint holds its own message
    only, not the prefetch slots of the healthy ones claimed with it. `announcement` is the
    broker message's id: the outbox row that announced the ref.
    """
    jobs = await _claims(platform).submit((ref, announcement))
    return await send_jobs(platform, jobs)


async def send_jobs(platform: Platform, jobs: Sequence[Job]) -> int:
    """Send claimed deliveries and record their outcomes (in waves, grouped with the other
    outcomes being recorded at the same moment); returns how many were attempted or
    deferred."""
    if not jobs:
        return 0
    now = utcnow()
    closed = {j.endpoint.id: j.endpoint for j in jobs if j.endpoint.circuit_state != "closed"}
    gates = await health.gate_circuits(platform, list(closed.values()), now) if closed else {}
    transport = transport_of(platform)
    # Record outcomes in waves: a hanging endpoint (up to the total timeout) must not hold
    # back the bookkeeping, FIFO successors and metrics of the ref's healthy deliveries.
    pending = {asyncio.ensure_future(_deliver(platform, transport, job, gates)) for job in jobs}
    while pending:
        done, pending = await asyncio.wait(pending, timeout=FINISH_WAVE_S)
        outcomes = []
        for task in done:
            if task.exception() is not None:
                # Left `sending`: the scheduler sends it again once the lease expires.
                log.error(
                    "delivery attempt crashed",
                    exc_info=task.exception(),
                    extra={"event": "delivery.attempt_error"},
                )
            else:
                outcomes.append(task.result())
        if outcomes:
            queued = await asyncio.gather(*(_outcomes(platform).submit(o) for o in outcomes))
            if any(queued):
                health.wake(platform)
            health.observe(outcomes)
    return len(jobs)


def _keys(
    transport: Transport, platform: Platform, endpoint: Endpoint
) -> tuple[list[bytes], list[bytes]]:
    """The active HMAC keys and Ed25519 seeds, cached per endpoint version (decrypting per
    attempt would cost more than signing)."""
    now = utcnow()
    cache_key = (endpoint.id, endpoint.updated_at)
    cached = transport.keys.get(cache_key)
    if cached is None or cached[0] <= now:
        stored = open_secrets(platform.keyring, endpoint)
        active = [s for s in stored if s.active(now)]
        hmac_keys = [signing.secret_key(s.value) for s in active if not s.is_ed25519]
        seeds = [signing.ed25519_seed(s.value) for s in active if s.is_ed25519]
        expiries = [s.expires_at for s in active if s.expires_at is not None]
        # Valid until the next secret expires (at most a minute, to bound the cache's age).
        valid_until = min([*expiries, now + dt.timedelta(seconds=60)])
        cached = transport.keys[cache_key] = (valid_until, hmac_keys, seeds)
        if len(transport.keys) > 10_000:
            transport.keys.clear()
            transport.keys[cache_key] = cached
    return cached[1], cached[2]


async def _deliver(
    platform: Platform, transport: Transport, job: Job, gates: dict[str, Gate]
) -> Outcome:
    endpoint, message, attempt = job.endpoint, job.message, job.attempt
    delivery_id, lease = job.delivery_id, job.lease_until
    settings = platform.settings.delivery
    now = utcnow()

    def wait(until: dt.datetime, why: str) -> Outcome:
        return Outcome(
            delivery_id,
            endpoint,
            message,
            attempt,
            "retrying",
            until,
            lease,
            why,
            attempt_delta=-1,
            announcement=job.announcement,
        )

    if not endpoint.enabled:
        return Outcome(
            delivery_id,
            endpoint,
            message,
            attempt,
            "dead",
            now,
            lease,
            f"endpoint disabled ({endpoint.disabled_reason})",
            attempt_delta=-1,
            announcement=job.announcement,
        )
    gate = gates.get(endpoint.id)
    probe = False
    if gate is not None:
        if not gate.probe or gate.used:
            return wait(gate.until, "circuit open")
        gate.used = probe = True
    if endpoint.rate_limit_per_s:
        rate = endpoint.rate_limit_per_s
        decision = await platform.limiter.hit(
            f"delivery:ep:{endpoint.id}", rate=rate, burst=max(1, math.ceil(rate))
        )
        if not decision.allowed:
            later = now + dt.timedelta(seconds=max(decision.retry_after_s, 0.01))
            return wait(later, "endpoint rate limit")
    try:
        hmac_keys, seeds = _keys(transport, platform, endpoint)
    except (DecryptionError, signing.InvalidSecret):
        log.error(
            "endpoint secrets unusable",
            extra={"event": "delivery.secrets_unreadable", "endpoint_id": endpoint.id},
        )
        return wait(now + dt.timedelta(seconds=300), "endpoint secrets unreadable")
    headers = {
        "content-type": "application/json",
        **endpoint.headers,
        **signing.headers(
            hmac_keys, message.id, int(time.time()), message.body, ed25519_seeds=seeds
        ),
    }
    outcome = Outcome(
        delivery_id,
        endpoint,
        message,
        attempt,
        "succeeded",
        now,
        lease,
        probe=probe,
        announcement=job.announcement,
    )
    urls = transport.urls(endpoint.id, [endpoint.url, *endpoint.fallback_urls], endpoint.routing)
    for url in urls:
        result = await transport.post(url, message.body, headers)
        outcome.results.append(result)
        transport.learn(endpoint.id, result)
        if result.ok or not result.try_next_url:
            break
    last = outcome.results[-1]
    done = utcnow()
    outcome.next_at = done
    if last.ok:
        return outcome
    outcome.error = last.error or f"HTTP {last.status}"
    if last.status == 410:
        outcome.status, outcome.gone = "dead", True
        outcome.error = "HTTP 410: the endpoint is gone (disabled)"
        return outcome
    delay = retry.delay_after(attempt, await job.schedule(platform), jitter=settings.retry_jitter)
    if delay is None:
        outcome.status = "dead"
        return outcome
    if last.status in (429, 503):
        wish = retry.parse_retry_after(last.retry_after, done)
        delay = retry.honour_retry_after(delay, wish, settings.retry_after_max_s)
    outcome.status = "retrying"
    outcome.next_at = done + dt.timedelta(seconds=delay)
    return outcome


def forget(platform: Platform) -> None:
    """Drop the process's claim and outcome committers (the worker is stopping)."""
    platform.extras.pop(_CLAIMS_KEY, None)
    platform.extras.pop(_OUTCOMES_KEY, None)
