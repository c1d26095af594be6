"""Sending through real loopback receivers: signatures that the official `standardwebhooks`
library verifies, retries with one webhook-id, dead deliveries and their retry, 410, 429 with
Retry-After, timeouts, resets, rotation grace, and the attempt log."""

from __future__ import annotations

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from relayport.core.platform import Platform
from tests.conftest import Account, api_key
from tests.delivery.conftest import (
    Receiver,
    create_endpoint,
    eventually,
    message_of,
    send_message,
    wait_for_delivery,
)

pytestmark = pytest.mark.usefixtures("worker")


async def test_message_is_delivered_signed_and_verifiable(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(client, account, receiver.url("/ok"), headers={"X-Team": "a"})
    message = await send_message(client, account, payload={"amount": 42})
    done = await wait_for_delivery(client, account, message["id"], "succeeded")
    assert done["attempts"] == 1
    [got] = receiver.at("/ok")
    assert got.headers["webhook-id"] == message["id"]
    assert got.headers["x-team"] == "a"
    assert got.headers["user-agent"].startswith("Relayport")
    parsed = Webhook(endpoint["secret"]).verify(got.body, got.headers)
    assert parsed["type"] == "invoice.paid"
    assert parsed["data"] == {"amount": 42}
    # A different secret must not verify: the check above could fail.
    other = Webhook("whsec_" + "QUJD" * 8)
    with pytest.raises(Exception, match="signature"):
        other.verify(got.body, got.headers)
    attempts = await client.get(f"/v1/messages/{message['id']}/attempts", headers=account.headers)
    [attempt] = attempts.json()["data"]
    assert attempt["succeeded"] is True
    assert attempt["status_code"] == 200
    assert attempt["response_snippet"] == "seen"
    assert attempt["latency_ms"] > 0


async def test_failures_retry_with_the_same_webhook_id_then_succeed(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    receiver.script["/flaky"] = ["fail", "fail", "ok"]
    endpoint = await create_endpoint(client, account, receiver.url("/flaky"))
    message = await send_message(client, account)
    done = await wait_for_delivery(client, account, message["id"], "succeeded")
    assert done["attempts"] == 3
    got = receiver.at("/flaky")
    assert [r.headers["webhook-id"] for r in got] == [message["id"]] * 3
    for request in got:
        Webhook(endpoint["secret"]).verify(request.body, request.headers)
    attempts = (
        await client.get(f"/v1/endpoints/{endpoint['id']}/attempts", headers=account.headers)
    ).json()["data"]
    assert [(a["attempt"], a["status_code"], a["error_class"]) for a in attempts] == [
        (3, 200, None),
        (2, 500, "http"),
        (1, 500, "http"),
    ]
    failed = await client.get(
        f"/v1/endpoints/{endpoint['id']}/attempts",
        params={"succeeded": "false"},
        headers=account.headers,
    )
    assert len(failed.json()["data"]) == 2


async def test_a_delivery_dies_after_the_schedule_and_can_be_retried(
    client: httpx.AsyncClient, account: Account, receiver: Receiver, platform: Platform
) -> None:
    receiver.script["/down"] = ["fail"] * 4 + ["ok"]
    await create_endpoint(client, account, receiver.url("/down"))
    message = await send_message(client, account)
    dead = await wait_for_delivery(client, account, message["id"], "dead")
    assert dead["attempts"] == len(platform.settings.delivery.retry_schedule_s)
    assert "HTTP 500" in dead["last_error"]
    listed = await client.get("/v1/messages", params={"status": "dead"}, headers=account.headers)
    assert [m["id"] for m in listed.json()["data"]] == [message["id"]]
    retried = await client.post(
        f"/v1/messages/{message['id']}/retry", json={}, headers=account.headers
    )
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"deliveries": 1}
    await wait_for_delivery(client, account, message["id"], "succeeded")
    assert len(receiver.at("/down")) == 5


async def test_410_disables_the_endpoint(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(client, account, receiver.url("/410"))
    message = await send_message(client, account)
    dead = await wait_for_delivery(client, account, message["id"], "dead")
    assert dead["attempts"] == 1
    got = (await client.get(f"/v1/endpoints/{endpoint['id']}", headers=account.headers)).json()
    assert got["enabled"] is False
    assert got["disabled_reason"] == "gone"
    # A disabled endpoint gets no new deliveries.
    later = await send_message(client, account)
    assert later["deliveries"] == []
    audit = await client.get("/v1/audit-events", headers=account.headers)
    assert "endpoint.disabled" in [e["action"] for e in audit.json()["data"]]


@pytest.mark.parametrize(
    "settings_overrides", [{"delivery": {"retry_schedule_s": [0, 0.01, 0.01]}}]
)
async def test_429_retry_after_is_honoured(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    receiver.script["/busy"] = ["429:1", "ok"]
    await create_endpoint(client, account, receiver.url("/busy"))
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    first, second = receiver.at("/busy")
    # The schedule says 10 ms; the receiver asked for 1 s.
    assert second.at - first.at >= 0.9


async def test_timeouts_resets_and_redirects_are_classified_failures(
    client: httpx.AsyncClient, account: Account, receiver: Receiver, resetter: str
) -> None:
    urls = {
        "timeout": receiver.url("/hang"),
        "connect": resetter,
        "http": receiver.url("/redirect"),
    }
    ids = {}
    for kind, url in urls.items():
        ids[kind] = (await create_endpoint(client, account, url, filter_types=[f"t.{kind}"]))["id"]
        await send_message(client, account, event_type=f"t.{kind}")

    async def classified() -> bool:
        for kind, endpoint_id in ids.items():
            data = (
                await client.get(f"/v1/endpoints/{endpoint_id}/attempts", headers=account.headers)
            ).json()["data"]
            if not data or data[-1]["error_class"] != kind:
                return False
        return True

    await eventually(classified, timeout=20, what="each failure classified")
    redirect = (
        await client.get(f"/v1/endpoints/{ids['http']}/attempts", headers=account.headers)
    ).json()["data"][-1]
    assert redirect["status_code"] == 307
    assert receiver.at("/ok") == []  # the redirect was not followed


async def test_response_snippet_is_capped_at_8_kib(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(client, account, receiver.url("/big"))
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    [attempt] = (
        await client.get(f"/v1/endpoints/{endpoint['id']}/attempts", headers=account.headers)
    ).json()["data"]
    assert len(attempt["response_snippet"]) == 8192


async def test_rotation_signs_with_both_secrets_during_the_grace_period(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(client, account, receiver.url("/ok"))
    old = endpoint["secret"]
    rotated = await client.post(
        f"/v1/endpoints/{endpoint['id']}/secret/rotate", json={}, headers=account.headers
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["key"]
    assert new != old
    assert rotated.json()["secrets"] == [new, old]
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    [got] = receiver.at("/ok")
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(got.body, got.headers)
    Webhook(new).verify(got.body, got.headers)
    # Without grace the old secret stops signing at once.
    again = await client.post(
        f"/v1/endpoints/{endpoint['id']}/secret/rotate",
        json={"grace_period_s": 0},
        headers=account.headers,
    )
    newest = again.json()["key"]
    assert again.json()["secrets"] == [newest]
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    last = receiver.at("/ok")[-1]
    Webhook(newest).verify(last.body, last.headers)
    with pytest.raises(Exception, match="signature"):
        Webhook(new).verify(last.body, last.headers)


async def test_ed25519_signature_verifies_with_the_public_key(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    endpoint = await create_endpoint(client, account, receiver.url("/ok"), ed25519=True)
    public = endpoint["ed25519_public_key"]
    assert public.startswith("whpk_")
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    [got] = receiver.at("/ok")
    Webhook(endpoint["secret"]).verify(got.body, got.headers)  # v1 still there
    [v1a] = [s for s in got.headers["webhook-signature"].split(" ") if s.startswith("v1a,")]
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public[5:]))
    signed = f"{got.headers['webhook-id']}.{got.headers['webhook-timestamp']}.".encode() + got.body
    key.verify(base64.b64decode(v1a[4:]), signed)  # raises InvalidSignature when wrong


async def test_fan_out_follows_type_filters_and_channels(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    everything = await create_endpoint(client, account, receiver.url("/all"))
    invoices = await create_endpoint(
        client, account, receiver.url("/inv"), filter_types=["invoice.*"]
    )
    exact = await create_endpoint(
        client, account, receiver.url("/exact"), filter_types=["user.created"]
    )
    eu = await create_endpoint(client, account, receiver.url("/eu"), channels=["eu"])
    m1 = await send_message(client, account, event_type="invoice.paid")
    m2 = await send_message(client, account, event_type="user.created", channels=["eu"])
    assert {d["endpoint_id"] for d in m1["deliveries"]} == {everything["id"], invoices["id"]}
    assert {d["endpoint_id"] for d in m2["deliveries"]} == {
        everything["id"],
        exact["id"],
        eu["id"],
    }
    await eventually(lambda: len(receiver.received) == 5, what="five deliveries")


async def test_idempotency_key_returns_the_original_message(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    await create_endpoint(client, account, receiver.url("/ok"))
    headers = {**account.headers, "Idempotency-Key": "order-1"}
    body = {"event_type": "invoice.paid", "payload": {"n": 1}}
    first = await client.post("/v1/messages", json=body, headers=headers)
    second = await client.post("/v1/messages", json=body, headers=headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    by_event_id = await client.post(
        "/v1/messages", json={**body, "event_id": "order-1"}, headers=account.headers
    )
    assert by_event_id.json()["id"] == first.json()["id"]
    await wait_for_delivery(client, account, first.json()["id"], "succeeded")
    assert len(receiver.at("/ok")) == 1


async def test_payload_breaking_the_schema_is_422(
    client: httpx.AsyncClient, account: Account
) -> None:
    schema = {
        "type": "object",
        "properties": {"amount": {"type": "integer", "minimum": 0}},
        "required": ["amount"],
    }
    created = await client.post(
        "/v1/event-types",
        json={"name": "invoice.paid", "schema": schema},
        headers=account.headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["schema"] == schema
    bad = await client.post(
        "/v1/messages",
        json={"event_type": "invoice.paid", "payload": {"amount": -1}},
        headers=account.headers,
    )
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["errors"][0]["pointer"] == "/payload/amount"
    good = await client.post(
        "/v1/messages",
        json={"event_type": "invoice.paid", "payload": {"amount": 3}},
        headers=account.headers,
    )
    assert good.status_code == 202
    broken = await client.post(
        "/v1/event-types",
        json={"name": "x.y", "schema": {"type": "nonsense"}},
        headers=account.headers,
    )
    assert broken.status_code == 422
    assert broken.json()["errors"][0]["code"] == "bad_schema"
    # A schema whose $ref points elsewhere is stored, but never fetched: a 422, not a 500.
    remote = await client.post(
        "/v1/event-types",
        json={"name": "r.t", "schema": {"$ref": "https://example.com/schema.json"}},
        headers=account.headers,
    )
    assert remote.status_code == 201, remote.text
    unusable = await client.post(
        "/v1/messages", json={"event_type": "r.t", "payload": {}}, headers=account.headers
    )
    assert unusable.status_code == 422, unusable.text
    assert unusable.json()["errors"][0]["code"] == "schema_unusable"


async def test_message_detail_shows_deliveries(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    await create_endpoint(client, account, receiver.url("/ok"))
    message = await send_message(client, account, payload={"k": "v"})
    got = await message_of(client, account, message["id"])
    assert got["payload"] == {"k": "v"}
    assert len(got["deliveries"]) == 1


async def test_an_idempotency_key_older_than_24_hours_starts_a_new_message(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    import datetime as dt

    from sqlalchemy import update

    from relayport.delivery.models import Message

    headers = {**account.headers, "Idempotency-Key": "k-1"}
    body = {"event_type": "a.b", "payload": {}}
    first = (await client.post("/v1/messages", json=body, headers=headers)).json()
    async with platform.db.transaction() as session:
        await session.execute(
            update(Message)
            .where(Message.id == first["id"])
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=25))
        )
    again = await client.post("/v1/messages", json=body, headers=headers)
    assert again.status_code == 202
    assert again.json()["id"] != first["id"]
    old = await client.get(f"/v1/messages/{first['id']}", headers=account.headers)
    assert old.json()["event_id"] is None  # the key moved to the new message


async def test_retry_schedule_per_tenant_and_per_endpoint(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    put = await client.put(
        "/v1/delivery-settings", json={"retry_schedule_s": [0, 0.01]}, headers=account.headers
    )
    assert put.status_code == 200, put.text
    assert put.json()["effective_retry_schedule_s"] == [0, 0.01]
    got = await client.get("/v1/delivery-settings", headers=account.headers)
    assert got.json()["retry_schedule_s"] == [0, 0.01]
    bad = await client.put(
        "/v1/delivery-settings", json={"retry_schedule_s": [-1]}, headers=account.headers
    )
    assert bad.status_code == 422
    viewer = await api_key(client, account, "viewer")
    denied = await client.put(
        "/v1/delivery-settings",
        json={"retry_schedule_s": None},
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert denied.status_code == 403
    await create_endpoint(client, account, receiver.url("/fail"), filter_types=["a.tenant"])
    await create_endpoint(
        client, account, receiver.url("/fail"), filter_types=["a.own"], retry_schedule_s=[0]
    )
    by_tenant = await send_message(client, account, event_type="a.tenant")
    by_endpoint = await send_message(client, account, event_type="a.own")
    assert (await wait_for_delivery(client, account, by_tenant["id"], "dead"))["attempts"] == 2
    assert (await wait_for_delivery(client, account, by_endpoint["id"], "dead"))["attempts"] == 1
