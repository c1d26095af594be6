"""Claims and leases at the repository level (PostgreSQL profile, where no worker runs unless a
test starts one): a worker that overran its lease cannot overwrite the attempt of the worker
that took the delivery over."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from relayport.core.platform import Platform
from relayport.delivery import repository
from relayport.delivery.models import Delivery
from tests.conftest import Account
from tests.delivery.conftest import Receiver, create_endpoint, send_message


def _row(delivery_id: str, attempt: int, lease: dt.datetime, status: str) -> dict[str, object]:
    now = dt.datetime.now(dt.UTC)
    return {
        "b_id": delivery_id,
        "b_attempt": attempt,
        "b_status": status,
        "b_attempt_delta": 0,
        "b_next": now,
        "b_error": None,
        "b_now": now,
        "b_lease": lease,
        "b_finished": now,
    }


@pytest.mark.parametrize("backend", ["postgres"])
async def test_an_expired_lease_cannot_overwrite_the_new_owners_attempt(
    client: httpx.AsyncClient, account: Account, receiver: Receiver, platform: Platform
) -> None:
    await create_endpoint(client, account, receiver.url("/ok"))
    message = await send_message(client, account)
    now = dt.datetime.now(dt.UTC)
    first_lease = now + dt.timedelta(milliseconds=1)
    async with platform.db.transaction() as session:
        [(delivery_id, _, _, attempt)] = await repository.claim(
            session, now=now, lease_until=first_lease, message_ids=[message["id"]]
        )
    assert attempt == 1
    later = now + dt.timedelta(seconds=1)
    async with platform.db.transaction() as session:
        # A second claim while the lease holds takes nothing.
        assert (
            await repository.claim(session, now=now, lease_until=later, message_ids=[message["id"]])
            == []
        )
        ids = await repository.dispatchable(session, now=later, stuck_before=now, limit=10)
        assert ids == [delivery_id]
        await repository.requeue(session, ids, now=later, stuck_before=now)
    second_lease = later + dt.timedelta(seconds=30)
    async with platform.db.transaction() as session:
        [(_, _, _, again)] = await repository.claim(
            session, now=later, lease_until=second_lease, delivery_ids=[delivery_id]
        )
    assert again == 1  # the lost attempt was given back
    async with platform.db.transaction() as session:
        await repository.finish(session, [_row(delivery_id, 1, first_lease, "dead")])
    async with platform.db.sessions() as session:
        row = await session.get(Delivery, delivery_id)
        assert row is not None
        assert row.status == "sending"  # the stale worker's word did not count
    async with platform.db.transaction() as session:
        await repository.finish(session, [_row(delivery_id, 1, second_lease, "succeeded")])
    async with platform.db.sessions() as session:
        row = await session.get(Delivery, delivery_id)
        assert row is not None
        assert row.status == "succeeded"
