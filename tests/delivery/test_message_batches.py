"""Group commit of POST /v1/messages and the per-process fan-out cache: concurrent messages
are stored in one transaction, yet each fails or succeeds on its own; a change made through
another app instance is seen by the very next message."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import func, select

from relayport.app import create_app
from relayport.core.outbox import OutboxMessage
from relayport.core.platform import Platform
from relayport.delivery import intake, messages, sender
from relayport.delivery.catalog import catalog_of
from relayport.delivery.messages import Accepted, NewMessage
from relayport.delivery.models import Message
from relayport.settings import Settings
from tests.conftest import Account
from tests.delivery.conftest import (
    Receiver,
    create_endpoint,
    eventually,
    send_message,
    wait_for_delivery,
)


async def _count(platform: Platform, tenant_id: str, key: str) -> int:
    async with platform.db.reads() as session:
        found = await session.scalar(
            select(func.count())
            .select_from(Message)
            .where(Message.tenant_id == tenant_id, Message.idempotency_key == key)
        )
    return int(found or 0)


async def test_a_key_repeated_within_one_batch_stores_one_message(
    platform: Platform, account: Account
) -> None:
    writer = intake.writer(platform)
    before = writer.batches
    items = [
        NewMessage(account.tenant_id, "order.created", {"n": i}, None, "same-key") for i in range(3)
    ]
    results = await asyncio.gather(*(intake.accept(platform, item) for item in items))
    assert writer.batches == before + 1  # submitted in one loop turn: one transaction
    assert len({r.message.id for r in results}) == 1
    assert [r.created for r in results].count(True) == 1
    assert await _count(platform, account.tenant_id, "same-key") == 1
    # A later repeat, in a batch of its own, gets the same message.
    again = await intake.accept(platform, items[0])
    assert not again.created
    assert again.message.id == results[0].message.id


async def test_a_poisoned_message_fails_alone(platform: Platform, account: Account) -> None:
    good = [
        NewMessage(account.tenant_id, "order.created", {"n": i}, None, f"good-{i}")
        for i in range(3)
    ]
    bad = NewMessage("ten_does_not_exist", "order.created", {}, None, "bad")  # FK violation
    results = await asyncio.gather(
        *(intake.accept(platform, item) for item in [good[0], bad, good[1], good[2]]),
        return_exceptions=True,
    )
    assert isinstance(results[1], Exception)
    for result in (results[0], results[2], results[3]):
        assert isinstance(result, Accepted)
        assert result.created
    for i in range(3):
        assert await _count(platform, account.tenant_id, f"good-{i}") == 1


async def test_a_payload_breaking_its_schema_is_refused_without_failing_the_batch(
    client: httpx.AsyncClient, platform: Platform, account: Account
) -> None:
    schema = {"type": "object", "required": ["n"]}
    response = await client.post(
        "/v1/event-types",
        json={"name": "order.checked", "schema": schema},
        headers=account.headers,
    )
    assert response.status_code == 201, response.text
    writer = intake.writer(platform)
    before = writer.batches
    items = [
        NewMessage(account.tenant_id, "order.checked", {"n": 1}, None, "valid"),
        NewMessage(account.tenant_id, "order.checked", {"x": 1}, None, "invalid"),
    ]
    valid, invalid = await asyncio.gather(
        *(intake.accept(platform, item) for item in items), return_exceptions=True
    )
    assert isinstance(valid, Accepted)
    assert valid.created
    assert isinstance(invalid, Exception)
    assert getattr(invalid, "status", None) == 422
    assert writer.batches == before + 1  # the refusal did not send the batch item by item
    assert await _count(platform, account.tenant_id, "invalid") == 0


async def test_a_cancelled_caller_does_not_cancel_its_batch(
    platform: Platform, account: Account
) -> None:
    def item(key: str) -> NewMessage:
        return NewMessage(account.tenant_id, "order.created", {}, None, key)

    gone = asyncio.create_task(intake.accept(platform, item("cancelled")))
    kept = asyncio.create_task(intake.accept(platform, item("kept")))
    await asyncio.sleep(0)  # both submitted; their batch starts on the next loop turn
    gone.cancel()
    result = await kept
    assert result.created
    with pytest.raises(asyncio.CancelledError):
        await gone

    async def stored() -> bool:
        return await _count(platform, account.tenant_id, "cancelled") == 1

    await eventually(stored, what="the cancelled caller's message to be stored")


async def _post(client: httpx.AsyncClient, account: Account, **body: Any) -> httpx.Response:
    body = {"event_type": "order.created", "payload": {"n": 1}} | body
    return await client.post("/v1/messages", json=body, headers=account.headers)


async def test_changes_made_through_another_instance_reach_the_next_message(
    app: FastAPI,
    client: httpx.AsyncClient,
    settings: Settings,
    account: Account,
    receiver: Receiver,
    platform: Platform,
) -> None:
    other_app = create_app(settings)
    async with LifespanManager(other_app, startup_timeout=30, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=other_app, client=("203.0.113.8", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as other:

            async def endpoint(via: httpx.AsyncClient, path: str) -> str:
                response = await via.post(
                    "/v1/endpoints", json={"url": receiver.url(path)}, headers=account.headers
                )
                assert response.status_code == 201, response.text
                return str(response.json()["id"])

            async def targets() -> set[str]:
                response = await _post(client, account)
                assert response.status_code == 202, response.text
                return {d["endpoint_id"] for d in response.json()["deliveries"]}

            first = await endpoint(client, "/ok/1")
            assert await targets() == {first}
            cache = catalog_of(platform)
            hits = cache.hits
            assert await targets() == {first}
            assert cache.hits > hits  # unchanged: served from this instance's cache

            second = await endpoint(other, "/ok/2")  # made through the other instance
            assert await targets() == {first, second}

            response = await other.patch(
                f"/v1/endpoints/{first}", json={"enabled": False}, headers=account.headers
            )
            assert response.status_code == 200, response.text
            assert await targets() == {second}

            response = await other.patch(
                f"/v1/endpoints/{second}",
                json={"filter_types": ["invoice.*"]},
                headers=account.headers,
            )
            assert response.status_code == 200, response.text
            assert await targets() == set()

            response = await other.post(
                "/v1/event-types",
                json={"name": "order.created", "schema": {"type": "object", "required": ["n"]}},
                headers=account.headers,
            )
            assert response.status_code == 201, response.text
            refused = await _post(client, account, payload={"x": 1})
            assert refused.status_code == 422, refused.text

            response = await other.delete(
                f"/v1/event-types/{'order.created'}", headers=account.headers
            )
            assert response.status_code == 204, response.text
            accepted = await _post(client, account, payload={"x": 1})
            assert accepted.status_code == 202, accepted.text


async def test_a_repeat_gets_its_original_even_after_its_type_gained_a_schema(
    client: httpx.AsyncClient, account: Account
) -> None:
    headers = account.headers | {"Idempotency-Key": "before-schema"}
    body = {"event_type": "order.created", "payload": {"x": 1}}
    first = await client.post("/v1/messages", json=body, headers=headers)
    assert first.status_code == 202, first.text
    response = await client.post(
        "/v1/event-types",
        json={"name": "order.created", "schema": {"type": "object", "required": ["n"]}},
        headers=account.headers,
    )
    assert response.status_code == 201, response.text
    repeat = await client.post("/v1/messages", json=body, headers=headers)
    assert repeat.status_code == 200, repeat.text
    assert repeat.json()["id"] == first.json()["id"]
    fresh = await client.post(
        "/v1/messages", json=body, headers=account.headers | {"Idempotency-Key": "after-schema"}
    )
    assert fresh.status_code == 422, fresh.text


async def _outbox_row(platform: Platform, message_id: str) -> OutboxMessage | None:
    async with platform.db.reads() as session:
        found = await session.scalar(
            select(OutboxMessage).where(OutboxMessage.payload == message_id.encode())
        )
    return found


@pytest.mark.usefixtures("worker")
async def test_a_message_is_published_at_once_and_its_claim_marks_its_outbox_row(
    client: httpx.AsyncClient, account: Account, receiver: Receiver, platform: Platform
) -> None:
    await create_endpoint(client, account, receiver.url("/ok"))
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    row = await _outbox_row(platform, message["id"])
    assert row is not None
    # Due for the relay only after the grace, yet sent: the worker's claim marked it.
    assert row.available_at > row.created_at
    assert row.sent_at is not None
    assert row.sent_at < row.available_at


@pytest.mark.usefixtures("worker")
async def test_a_message_whose_direct_publish_was_lost_is_sent_by_the_relay(
    client: httpx.AsyncClient,
    account: Account,
    receiver: Receiver,
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def lost(*_args: Any) -> None:  # as if the process died right after the commit
        return None

    monkeypatch.setattr(intake, "_publish", lost)
    monkeypatch.setattr(intake, "DIRECT_PUBLISH_GRACE_S", 0.3)
    await create_endpoint(client, account, receiver.url("/ok"))
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    assert [r.headers["webhook-id"] for r in receiver.at("/ok")] == [message["id"]]


@pytest.mark.usefixtures("worker")
async def test_a_hanging_endpoint_holds_only_its_own_broker_message(
    client: httpx.AsyncClient, account: Account, receiver: Receiver, platform: Platform
) -> None:
    await create_endpoint(client, account, receiver.url("/hang"), filter_types=["slow.event"])
    await create_endpoint(client, account, receiver.url("/ok"), filter_types=["fast.event"])
    # Stored without being announced (not due for the relay for a minute), so only the calls
    # below send them.
    async with platform.db.transaction() as session:
        stored = await messages.store_messages(
            session,
            [
                NewMessage(account.tenant_id, "slow.event", {}),
                NewMessage(account.tenant_id, "fast.event", {}),
            ],
            idempotency_ttl_s=60,
            publish_grace_s=60,
        )
    slow_id, fast_id = (s.message.id for s in stored if isinstance(s, Accepted))
    claims = sender._claims(platform)
    before = claims.batches
    slow = asyncio.create_task(sender.send_ref(platform, slow_id))
    fast = asyncio.create_task(sender.send_ref(platform, fast_id))
    assert await asyncio.wait_for(fast, 10) == 1  # sent and recorded: its message is acked
    assert claims.batches == before + 1  # both were claimed in one transaction
    assert not slow.done()  # still waiting for its receiver (up to the 2 s total timeout)
    assert receiver.at("/ok")
    assert await asyncio.wait_for(slow, 10) == 1


@pytest.mark.usefixtures("worker")
async def test_an_endpoint_the_worker_disables_gets_no_further_deliveries(
    client: httpx.AsyncClient, account: Account, receiver: Receiver, platform: Platform
) -> None:
    gone = await create_endpoint(client, account, receiver.url("/410"))
    kept = await create_endpoint(client, account, receiver.url("/ok"))
    first = await send_message(client, account)  # also fills this process's fan-out cache
    assert {d["endpoint_id"] for d in first["deliveries"]} == {gone["id"], kept["id"]}

    async def disabled() -> bool:
        response = await client.get(f"/v1/endpoints/{gone['id']}", headers=account.headers)
        return response.json()["enabled"] is False

    await eventually(disabled, what="the 410 to disable the endpoint")
    second = await send_message(client, account)
    assert {d["endpoint_id"] for d in second["deliveries"]} == {kept["id"]}
