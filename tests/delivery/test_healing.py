"""Healing: the circuit breaker opens and closes, failover and round robin across URLs, the
per-endpoint rate limit, FIFO ordering, auto-disable, operational events, recover and replay."""

from __future__ import annotations

import datetime as dt

import httpx
import orjson
import pytest

from tests.conftest import Account
from tests.delivery.conftest import (
    Receiver,
    create_endpoint,
    eventually,
    message_of,
    send_message,
    wait_for_delivery,
)

pytestmark = pytest.mark.usefixtures("worker")

BREAKER = {
    "delivery": {
        "retry_schedule_s": [0, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],
        "breaker_min_requests": 3,
        "breaker_failure_ratio": 0.5,
        "breaker_open_s": 0.5,
    }
}


def _types(receiver: Receiver, path: str) -> list[str]:
    return [orjson.loads(r.body)["type"] for r in receiver.at(path)]


@pytest.mark.parametrize("settings_overrides", [BREAKER])
async def test_breaker_opens_holds_deliveries_then_closes_after_a_probe(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    ops = await create_endpoint(client, account, receiver.url("/ops"), filter_types=["endpoint.*"])
    endpoint = await create_endpoint(
        client, account, receiver.url("/sick"), filter_types=["invoice.*"]
    )
    receiver.script["/sick"] = ["fail"]
    messages = [await send_message(client, account) for _ in range(3)]

    async def opened() -> bool:
        got = await client.get(f"/v1/endpoints/{endpoint['id']}", headers=account.headers)
        return bool(got.json()["circuit_state"] in ("open", "half_open"))

    await eventually(opened, what="the circuit to open")
    await eventually(
        lambda: "endpoint.circuit_opened" in _types(receiver, "/ops"), what="operational event"
    )
    event = orjson.loads(receiver.at("/ops")[0].body)
    assert event["data"]["endpoint_id"] == endpoint["id"]
    assert ops["id"] not in str(event["data"])
    # While open, deliveries wait instead of burning attempts: far fewer requests than the
    # 3 x 10 attempts the schedule would allow in this time.
    receiver.script["/sick"] = ["ok"]
    for message in messages:
        await wait_for_delivery(client, account, message["id"], "succeeded", timeout=20)
    final = await client.get(f"/v1/endpoints/{endpoint['id']}", headers=account.headers)
    assert final.json()["circuit_state"] == "closed"
    assert len(receiver.at("/sick")) < 15


async def test_failover_tries_the_fallback_within_one_attempt(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(
        client, account, receiver.url("/fail"), fallback_urls=[receiver.url("/backup")]
    )
    message = await send_message(client, account)
    done = await wait_for_delivery(client, account, message["id"], "succeeded")
    assert done["attempts"] == 1
    attempts = (
        await client.get(f"/v1/endpoints/{endpoint['id']}/attempts", headers=account.headers)
    ).json()["data"]
    assert [(a["attempt"], a["url"].rsplit("/", 1)[1], a["succeeded"]) for a in attempts] == [
        (1, "backup", True),
        (1, "fail", False),
    ]
    assert receiver.at("/backup")[0].headers["webhook-id"] == message["id"]


async def test_round_robin_spreads_messages_over_the_urls(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    await create_endpoint(
        client,
        account,
        receiver.url("/a"),
        fallback_urls=[receiver.url("/b")],
        routing="round_robin",
    )
    for _ in range(4):
        message = await send_message(client, account)
        await wait_for_delivery(client, account, message["id"], "succeeded")
    assert len(receiver.at("/a")) == 2
    assert len(receiver.at("/b")) == 2


async def test_adaptive_routing_moves_traffic_to_the_healthy_url(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    await create_endpoint(
        client,
        account,
        receiver.url("/fail"),
        fallback_urls=[receiver.url("/good")],
        routing="adaptive",
    )
    for _ in range(12):
        message = await send_message(client, account)
        await wait_for_delivery(client, account, message["id"], "succeeded")
    # Failover alone would hit /fail first every time (12 requests).
    assert len(receiver.at("/good")) == 12
    assert len(receiver.at("/fail")) < 8


async def test_rate_limit_spreads_deliveries_without_burning_attempts(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    await create_endpoint(client, account, receiver.url("/ok"), rate_limit_per_s=5)
    messages = [await send_message(client, account) for _ in range(10)]
    for message in messages:
        done = await wait_for_delivery(client, account, message["id"], "succeeded")
        assert done["attempts"] == 1
    times = [r.at for r in receiver.at("/ok")]
    assert len(times) == 10
    # Burst 5, then 5 per second: the last five need about a second.
    assert max(times) - min(times) >= 0.7


@pytest.mark.parametrize(
    "settings_overrides", [{"delivery": {"retry_schedule_s": [0, 0.1, 0.1, 0.1]}}]
)
async def test_fifo_endpoint_receives_messages_in_order(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    receiver.script["/fifo"] = ["fail", "fail", "ok"]
    await create_endpoint(client, account, receiver.url("/fifo"), fifo=True)
    sent = [await send_message(client, account, payload={"n": i}) for i in range(4)]
    for message in sent:
        await wait_for_delivery(client, account, message["id"], "succeeded")
    order = [r.headers["webhook-id"] for r in receiver.at("/fifo")]
    assert order == [sent[0]["id"]] * 3 + [m["id"] for m in sent[1:]]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"delivery": {"retry_schedule_s": [0, 0.3, 0.3, 0.3], "disable_after_s": 0.2}}],
)
async def test_endpoint_failing_too_long_is_disabled_with_events(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    await create_endpoint(
        client,
        account,
        receiver.url("/ops"),
        filter_types=["endpoint.disabled", "message.attempt.exhausted"],
    )
    endpoint = await create_endpoint(
        client, account, receiver.url("/fail"), filter_types=["invoice.*"]
    )
    message = await send_message(client, account)
    dead = await wait_for_delivery(client, account, message["id"], "dead")
    assert "disabled" in dead["last_error"]
    got = (await client.get(f"/v1/endpoints/{endpoint['id']}", headers=account.headers)).json()
    assert (got["enabled"], got["disabled_reason"]) == (False, "failing")
    await eventually(
        lambda: "endpoint.disabled" in _types(receiver, "/ops"), what="endpoint.disabled event"
    )
    audit = await client.get("/v1/audit-events", headers=account.headers)
    assert any(
        e["action"] == "endpoint.disabled" and e["actor_type"] == "system"
        for e in audit.json()["data"]
    )


async def test_exhausted_delivery_emits_an_operational_event_and_recovers(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    await create_endpoint(
        client, account, receiver.url("/ops"), filter_types=["message.attempt.exhausted"]
    )
    receiver.script["/down"] = ["fail"] * 4 + ["ok"]
    endpoint = await create_endpoint(
        client, account, receiver.url("/down"), filter_types=["invoice.*"]
    )
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "dead")
    await eventually(lambda: bool(receiver.at("/ops")), what="message.attempt.exhausted")
    event = orjson.loads(receiver.at("/ops")[0].body)
    assert event["type"] == "message.attempt.exhausted"
    assert event["data"]["message_id"] == message["id"]
    assert event["data"]["attempts"] == 4
    recovered = await client.post(
        f"/v1/endpoints/{endpoint['id']}/recover",
        params={"since": before.isoformat()},
        headers=account.headers,
    )
    assert recovered.json() == {"deliveries": 1}
    await wait_for_delivery(client, account, message["id"], "succeeded")
    # Replay sends succeeded deliveries again, with the same webhook-id.
    replayed = await client.post(f"/v1/endpoints/{endpoint['id']}/replay", headers=account.headers)
    assert replayed.json() == {"deliveries": 1}
    await eventually(lambda: len(receiver.at("/down")) == 6, what="the replayed delivery")
    assert {r.headers["webhook-id"] for r in receiver.at("/down")} == {message["id"]}
    await wait_for_delivery(client, account, message["id"], "succeeded")
    detail = await message_of(client, account, message["id"])
    assert detail["deliveries"][0]["attempts"] == 1  # a replay starts a fresh budget


async def test_a_hanging_endpoint_does_not_hold_back_the_others(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    slow = await create_endpoint(client, account, receiver.url("/hang"))
    fast = await create_endpoint(client, account, receiver.url("/ok"))
    message = await send_message(client, account)
    states: dict[str, str] = {}

    async def fast_done() -> bool:
        detail = await message_of(client, account, message["id"])
        states.update({d["endpoint_id"]: d["status"] for d in detail["deliveries"]})
        return states.get(fast["id"]) == "succeeded"

    # Same message, same batch: the fast delivery is recorded while the slow one still hangs
    # (the attempt timeout in these tests is 2 s).
    await eventually(fast_done, timeout=1.5, what="the fast delivery to be recorded")
    assert states[slow["id"]] == "sending"
