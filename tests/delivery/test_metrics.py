"""Delivery metrics on the one registry, and the per-endpoint health summary."""

from __future__ import annotations

import httpx
import pytest

from relayport.core.telemetry.metrics import REGISTRY
from tests.conftest import Account
from tests.delivery.conftest import Receiver, create_endpoint, send_message, wait_for_delivery

pytestmark = pytest.mark.usefixtures("worker")


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_metrics_and_health_follow_attempts(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    receiver.script["/flaky"] = ["fail", "ok"]
    before = {
        "ok": _value("deliveries_total", {"result": "succeeded"}),
        "retry": _value("deliveries_total", {"result": "retrying"}),
        "attempts": _value("delivery_attempt_duration_seconds_count"),
        "e2e": _value("delivery_end_to_end_seconds_count"),
        "per_message": _value("attempts_per_message_sum"),
    }
    endpoint = await create_endpoint(client, account, receiver.url("/flaky"))
    message = await send_message(client, account)
    await wait_for_delivery(client, account, message["id"], "succeeded")
    assert _value("deliveries_total", {"result": "succeeded"}) - before["ok"] == 1
    assert _value("deliveries_total", {"result": "retrying"}) - before["retry"] == 1
    assert _value("delivery_attempt_duration_seconds_count") - before["attempts"] == 2
    assert _value("delivery_end_to_end_seconds_count") - before["e2e"] == 1
    assert _value("attempts_per_message_sum") - before["per_message"] == 2
    exposed = (await client.get("/metrics")).text
    for name in (
        "deliveries_total",
        "delivery_attempt_duration_seconds",
        "delivery_end_to_end_seconds",
        "attempts_per_message",
    ):
        assert name in exposed
    health = await client.get(f"/v1/endpoints/{endpoint['id']}/health", headers=account.headers)
    assert health.status_code == 200, health.text
    body = health.json()
    assert (body["attempts"], body["succeeded"], body["success_rate"]) == (2, 1, 0.5)
    assert body["errors"] == {"http": 1}
    assert body["latency_p50_ms"] > 0
    assert body["circuit_state"] == "closed"
