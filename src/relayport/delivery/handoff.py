"""Hand-off: a process that stores messages and also runs the delivery worker (the embedded
default) stores a new message's deliveries already claimed by itself, leased as a worker's
claim would leave them (`messages.fan_out_many(claim_until=…)`), and sends them once that
transaction has committed: no broker message and no claim transaction on the path of a lone
message. The message's outbox row is still written, due when the lease ends and marked sent
with the outcome, so a process that dies in between is recovered like a worker that died
mid-send: the relay announces the message, the scheduler finds the expired leases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core import gcpolicy
from relayport.core.platform import Platform
from relayport.delivery import repository
from relayport.delivery.sender import Job, TenantSchedules, send_jobs

log = logging.getLogger("relayport.delivery")

_HANDOFF_KEY = "delivery.handoffs"
MAX_HANDOFFS = 64  # messages sent by their storing process at once (see `can_hand_off`)


def _handoffs(platform: Platform) -> set[asyncio.Task[int]]:
    tasks: set[asyncio.Task[int]] = platform.extras.setdefault(_HANDOFF_KEY, set())
    return tasks


def can_hand_off(platform: Platform) -> bool:
    """Whether this process may store new messages' deliveries already claimed by itself and
    send them without a broker message: only where it runs the delivery worker itself (an
    in-process broker, `Settings.embedded`), and while fewer than `MAX_HANDOFFS` messages it
    took so are still being sent (as the broker consumer's prefetch bounds the others), so
    a slow endpoint cannot pile up leases that run out while waiting for a sending slot."""
    return platform.settings.embedded and len(_handoffs(platform)) < MAX_HANDOFFS


async def handoff_jobs(
    platform: Platform, session: AsyncSession, stored: Sequence[Any]
) -> dict[str, list[Job]]:
    """In the storing transaction: the jobs of messages whose deliveries were stored claimed
    (`messages.Accepted` with `claimed_until`), by message id. Reads their endpoints."""
    claimed = [a for a in stored if a.claimed_until is not None and a.deliveries]
    if not claimed:
        return {}
    endpoint_ids = {d["endpoint_id"] for a in claimed for d in a.deliveries}
    endpoints = {e.id: e for e in await repository.endpoints_by_ids(session, list(endpoint_ids))}
    schedules = TenantSchedules(platform, {a.message.tenant_id for a in claimed})
    return {
        a.message.id: [
            Job(
                d["id"],
                endpoints[d["endpoint_id"]],
                a.message,
                1,
                schedules,
                a.claimed_until,
                a.announcement,
            )
            for d in a.deliveries
        ]
        for a in claimed
    }


def hand_off(platform: Platform, jobs: Sequence[Job]) -> None:
    """Send jobs claimed at storing, in the background (call once their claim committed)."""
    if platform.settings.gc_freeze:
        gcpolicy.freeze_once("delivery")
    tasks = _handoffs(platform)
    task = asyncio.get_running_loop().create_task(send_jobs(platform, jobs))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(_handed_off)


def _handed_off(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Left `sending`: the scheduler sends them again once their leases expire.
        log.error(
            "handed-off deliveries failed",
            exc_info=task.exception(),
            extra={"event": "delivery.handoff_error"},
        )


async def drain(platform: Platform, timeout_s: float) -> None:
    """Let the deliveries handed off in this process finish, up to `timeout_s` (the worker is
    stopping); those cut off are sent again once their leases expire."""
    tasks = _handoffs(platform)
    while tasks:
        pending = list(tasks)
        done, late = await asyncio.wait(pending, timeout=timeout_s)
        tasks.difference_update(done)
        if late:
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            tasks.difference_update(late)
            break
