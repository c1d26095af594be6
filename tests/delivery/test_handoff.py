"""Hand-off on the embedded default: the process that stores a message also runs the worker, so
it stores the deliveries already claimed (leased) and sends them itself, with no broker message
and no claim transaction. The outbox row and the lease still make it survive a crash."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from relayport.core.outbox import OutboxMessage
from relayport.core.platform import Platform
from relayport.delivery import handoff
from relayport.delivery.models import Delivery
from tests.conftest import Account
from tests.delivery.conftest import (
    Receiver,
    create_endpoint,
    eventually,
    send_message,
    wait_for_delivery,
)

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])


async def _outbox_sent(platform: Platform, message_id: str) -> bool:
    async with platform.db.reads() as session:
        rows = (
            await session.execute(
                select(OutboxMessage.sent_at).where(OutboxMessage.payload == message_id.encode())
            )
        ).all()
    return len(rows) == 1 and rows[0][0] is not None


async def test_a_message_is_sent_by_the_process_that_stored_it_without_a_claim(
    client: httpx.AsyncClient,
    account: Account,
    receiver: Receiver,
    platform: Platform,
    worker: None,
) -> None:
    await create_endpoint(client, account, receiver.url("/ok"))
    message = await send_message(client, account)
    # Stored claimed for its first attempt, in the transaction that stored the message.
    assert [(d["status"], d["attempts"]) for d in message["deliveries"]] == [("sending", 1)]
    await wait_for_delivery(client, account, message["id"], "succeeded")
    assert [r.headers["webhook-id"] for r in receiver.at("/ok")] == [message["id"]]
    # No broker message, so no claim: the claim committer was never needed.
    assert "delivery.claims" not in platform.extras
    # The outbox row, kept as the fallback, is marked sent with the outcome.
    await eventually(lambda: _outbox_sent(platform, message["id"]), what="outbox row sent")


async def test_fifo_deliveries_are_not_claimed_at_storing(
    client: httpx.AsyncClient,
    account: Account,
    receiver: Receiver,
    platform: Platform,
    worker: None,
) -> None:
    await create_endpoint(client, account, receiver.url("/ok"), fifo=True)
    message = await send_message(client, account)
    # FIFO order is checked by the worker's claim: it goes the broker way.
    assert [d["status"] for d in message["deliveries"]] == ["pending"]
    await wait_for_delivery(client, account, message["id"], "succeeded")


@pytest.mark.parametrize("settings_overrides", [{"delivery": {"lease_s": 0.3}}])
async def test_a_handed_off_delivery_whose_sender_died_is_sent_again(
    client: httpx.AsyncClient,
    account: Account,
    receiver: Receiver,
    platform: Platform,
    worker: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dropped: list[Any] = []
    # The process "dies" between the commit and the send: nothing sends the claimed jobs.
    monkeypatch.setattr(handoff, "hand_off", lambda _platform, jobs: dropped.extend(jobs))
    await create_endpoint(client, account, receiver.url("/ok"))
    message = await send_message(client, account)
    assert len(dropped) == 1
    assert receiver.at("/ok") == []
    # Once the lease ends, the scheduler (or the outbox relay) announces it again.
    delivered = await wait_for_delivery(client, account, message["id"], "succeeded")
    assert [r.headers["webhook-id"] for r in receiver.at("/ok")] == [message["id"]]
    assert delivered["attempts"] == 1  # the lost attempt was given back
    async with platform.db.reads() as session:
        row = await session.get(Delivery, delivered["id"])
        assert row is not None
        assert row.locked_until is None


@pytest.mark.parametrize("settings_overrides", [{"delivery": {"concurrency": 1}}])
async def test_hand_offs_are_bounded_and_the_rest_go_through_the_broker(
    client: httpx.AsyncClient,
    account: Account,
    receiver: Receiver,
    platform: Platform,
    worker: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handoff, "MAX_HANDOFFS", 1)
    await create_endpoint(client, account, receiver.url("/hang"))
    first = await send_message(client, account)  # handed off; its send hangs
    assert first["deliveries"][0]["status"] == "sending"
    await eventually(lambda: len(receiver.at("/hang")) == 1, what="the hanging send")
    second = await send_message(client, account)
    assert second["deliveries"][0]["status"] == "pending"  # no room: published instead
