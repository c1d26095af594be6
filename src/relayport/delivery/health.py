"""After a batch of attempts: log them, record each delivery's outcome, and keep each
endpoint's health: the circuit breaker, auto-disable after failing for days, 410 Gone, the
operational events about all of that, and the next FIFO delivery.

The breaker's state lives on the endpoint row so every worker honours it; the failure-rate
window that decides to open it is per worker (`FailureWindow`), so with several workers each
opens on what it saw itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core import audit
from relayport.core.db import utcnow
from relayport.core.groupcommit import write_transaction
from relayport.core.ids import new_id
from relayport.core.platform import Platform
from relayport.delivery import catalog, filters, messages, repository
from relayport.delivery.metrics import (
    ATTEMPTS_PER_MESSAGE,
    CIRCUIT_STATE,
    CIRCUIT_VALUES,
    DELIVERIES,
    END_TO_END,
)
from relayport.delivery.models import Endpoint
from relayport.delivery.transport import Transport

if TYPE_CHECKING:
    from relayport.delivery.sender import Gate, Outcome

log = logging.getLogger("relayport.delivery")

wake = messages.wake


async def gate_circuits(
    platform: Platform, endpoints: Sequence[Endpoint], now: dt.datetime
) -> dict[str, Gate]:
    """For each endpoint whose circuit is not closed: wait, or (once its open period is over)
    send one half-open probe. Taking the probe is a guarded UPDATE, so one worker probes."""
    from relayport.delivery.sender import Gate

    gates: dict[str, Gate] = {}
    settings = platform.settings.delivery
    for endpoint in endpoints:
        if endpoint.circuit_state == "closed":
            continue
        until = endpoint.circuit_until or now
        if until > now:
            gates[endpoint.id] = Gate(probe=False, until=until)
            continue
        probe_until = now + dt.timedelta(seconds=settings.lease_s)
        async with write_transaction(platform) as session:
            won = await session.execute(
                update(Endpoint)
                .where(
                    Endpoint.id == endpoint.id,
                    Endpoint.circuit_state.in_(("open", "half_open")),
                    Endpoint.circuit_until <= now,
                )
                .values(circuit_state="half_open", circuit_until=probe_until)
                .returning(Endpoint.id)
                .execution_options(synchronize_session=False)
            )
            probing = won.first() is not None
        CIRCUIT_STATE.labels(endpoint.id).set(CIRCUIT_VALUES["half_open"])
        gates[endpoint.id] = Gate(probe=probing, until=probe_until)
    return gates


def _attempt_rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        for r in o.results:
            rows.append(
                {
                    "id": new_id("atm"),
                    "tenant_id": o.message.tenant_id,
                    "delivery_id": o.delivery_id,
                    "message_id": o.message.id,
                    "endpoint_id": o.endpoint_id,
                    "attempt": o.attempt,
                    "url": r.url,
                    "succeeded": r.ok,
                    "status_code": r.status,
                    "error_class": r.error_class,
                    "error": r.error,
                    "latency_ms": round(r.latency_s * 1000, 3),
                    "response_snippet": r.snippet,
                    "created_at": utcnow(),
                }
            )
    return rows


async def record(
    platform: Platform,
    transport: Transport,
    session: AsyncSession,
    outcomes: Sequence[Outcome],
) -> bool:
    """Log a batch of attempts and record their deliveries' outcomes and their endpoints'
    health in the caller's transaction; True if it queued work to announce (wake the relay
    once it has committed)."""
    if not outcomes:
        return False
    now = utcnow()
    rows = [
        {
            "b_id": o.delivery_id,
            "b_attempt": o.attempt,
            "b_status": o.status,
            "b_attempt_delta": o.attempt_delta,
            "b_next": o.next_at,
            "b_error": o.error,
            "b_now": now,
            "b_lease": o.lease_until,
            "b_finished": now if o.status in ("succeeded", "dead") else None,
        }
        for o in outcomes
    ]
    enqueued = False
    attempt_rows = _attempt_rows(outcomes)
    await repository.insert_attempts(session, attempt_rows)
    await repository.finish(session, rows)
    # Deliveries claimed when their message was stored (`handoff`): their outbox row
    # is done once an attempt is recorded; the leases stand for the rest.
    await repository.mark_announced(
        session, sorted({o.announcement for o in outcomes if o.announcement}), now
    )
    by_endpoint: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_endpoint.setdefault(o.endpoint.id, []).append(o)
    enabled_before = {e.id for e in (m[0].endpoint for m in by_endpoint.values()) if e.enabled}
    for mine in by_endpoint.values():
        enqueued |= await _endpoint_health(
            platform, transport, session, mine[0].endpoint, mine, now
        )
    # Fan-out must skip the endpoints disabled here from now on. The tenant's version row is
    # locked after the endpoint rows, in the order every endpoint change takes them (see
    # `service`), so this cannot deadlock with one.
    await catalog.bump(
        session,
        [
            m[0].endpoint.tenant_id
            for m in by_endpoint.values()
            if m[0].endpoint.id in enabled_before and not m[0].endpoint.enabled
        ],
    )
    for o in outcomes:
        if o.status == "dead" and o.sent and o.message.event_type not in filters.OPERATIONAL_TYPES:
            enqueued |= await _operational(
                session,
                o.message.tenant_id,
                "message.attempt.exhausted",
                {
                    "message_id": o.message.id,
                    "endpoint_id": o.endpoint_id,
                    "event_type": o.message.event_type,
                    "attempts": o.attempt,
                    "last_error": o.error,
                },
            )
    fifo = [
        endpoint_id
        for endpoint_id, mine in by_endpoint.items()
        if mine[0].endpoint.fifo and any(o.status != "retrying" for o in mine)
    ]
    if fifo:
        successors = await repository.next_fifo(session, fifo)
        messages.enqueue_deliveries(session, successors)
        enqueued |= bool(successors)
    return enqueued


def observe(outcomes: Sequence[Outcome]) -> None:
    """Metrics and logs of recorded outcomes (after their commit)."""
    for o in outcomes:
        DELIVERIES.labels(o.status if o.sent else "deferred").inc()
        if o.status == "succeeded":
            END_TO_END.observe(max(0.0, (o.next_at - o.message.created_at).total_seconds()))
        if o.status in ("succeeded", "dead") and o.sent:
            ATTEMPTS_PER_MESSAGE.observe(o.attempt)
        if o.sent and not o.ok:
            log.info(
                "delivery attempt failed",
                extra={
                    "event": "delivery.attempt_failed",
                    "delivery_id": o.delivery_id,
                    "endpoint_id": o.endpoint_id,
                    "attempt": o.attempt,
                    "outcome": o.status,
                    "error_class": o.results[-1].error_class,
                    "status_code": o.results[-1].status,
                },
            )


async def _endpoint_health(
    platform: Platform,
    transport: Transport,
    session: AsyncSession,
    endpoint: Endpoint,
    outcomes: Sequence[Outcome],
    now: dt.datetime,
) -> bool:
    """Update one endpoint's breaker, failure clock and enabled flag; True if an operational
    event was queued."""
    settings = platform.settings.delivery
    sent = [o for o in outcomes if o.sent]
    if not sent:
        return False
    window = transport.window(endpoint.id)
    clock = time.monotonic()
    for o in sent:
        window.record(clock, o.ok)
    queued = False
    values: dict[str, Any] = {}
    ok = any(o.ok for o in sent)
    probe = next((o for o in sent if o.probe), None)
    if probe is not None and probe.ok:
        values |= {"circuit_state": "closed", "circuit_until": None}
        window.reset()
        CIRCUIT_STATE.labels(endpoint.id).set(CIRCUIT_VALUES["closed"])
    elif (probe is not None and not probe.ok) or (
        endpoint.circuit_state == "closed" and window.should_open(clock)
    ):
        until = now + dt.timedelta(seconds=settings.breaker_open_s)
        values |= {"circuit_state": "open", "circuit_until": until}
        CIRCUIT_STATE.labels(endpoint.id).set(CIRCUIT_VALUES["open"])
        if probe is None:
            queued |= await _operational(
                session,
                endpoint.tenant_id,
                "endpoint.circuit_opened",
                {
                    "endpoint_id": endpoint.id,
                    "until": until.isoformat(),
                    "failure_rate": round(window.failure_rate(clock), 3),
                },
            )
            log.warning(
                "circuit opened",
                extra={"event": "delivery.circuit_opened", "endpoint_id": endpoint.id},
            )
    if ok:
        if endpoint.failing_since is not None:  # no write at all on the common healthy path
            values["failing_since"] = None
    elif endpoint.failing_since is None:
        values["failing_since"] = now
    reason = None
    if any(o.gone for o in sent):
        reason = "gone"
    elif (
        not ok
        and endpoint.failing_since is not None
        and (now - endpoint.failing_since).total_seconds() >= settings.disable_after_s
    ):
        reason = "failing"
    if reason is not None and endpoint.enabled:
        values |= {"enabled": False, "disabled_reason": reason}
    if values:
        stmt = update(Endpoint).where(Endpoint.id == endpoint.id)
        if "circuit_state" in values and values["circuit_state"] == "open" and probe is None:
            stmt = stmt.where(Endpoint.circuit_state == "closed")  # one worker opens it
        await session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    if reason is not None and endpoint.enabled:
        endpoint.enabled = False  # the rest of this batch sees it
        audit.record(
            session,
            action="endpoint.disabled",
            tenant_id=endpoint.tenant_id,
            actor_type="system",
            actor_id=None,
            ip=None,
            target_type="endpoint",
            target_id=endpoint.id,
            details={"reason": reason},
        )
        queued |= await _operational(
            session,
            endpoint.tenant_id,
            "endpoint.disabled",
            {"endpoint_id": endpoint.id, "reason": reason, "url": endpoint.url},
        )
        log.warning(
            "endpoint disabled",
            extra={
                "event": "delivery.endpoint_disabled",
                "endpoint_id": endpoint.id,
                "reason": reason,
            },
        )
    return queued


async def _operational(
    session: AsyncSession, tenant_id: str, event_type: str, data: dict[str, Any]
) -> bool:
    """Send an operational event to the tenant's endpoints that subscribed to it."""
    _, rows, _ = await messages.create_message(
        session,
        tenant_id,
        event_type=event_type,
        payload=data,
        channels=None,
        idempotency_key=None,
        idempotency_ttl_s=0,
        validate=False,
    )
    return bool(rows)
