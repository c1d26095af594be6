"""Inbound-webhook metrics move as deliveries and jobs happen; hostile signature headers sent
through HTTP never produce a 500."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayport.core.outbox import pending_count
from relayport.core.platform import Platform
from relayport.core.telemetry.metrics import REGISTRY
from relayport.ingest import handlers, signatures
from relayport.ingest.worker import tick
from tests.conftest import Account
from tests.core.test_auth import assert_problem
from tests.ingest.conftest import create_source, deliver, wait_for_job


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counters:
    """Metric values at construction; `delta` tells how much one moved since."""

    def __init__(self, *names: tuple[str, dict[str, str]]) -> None:
        self.before = {(n, tuple(sorted(lbl.items()))): sample(n, **lbl) for n, lbl in names}

    def delta(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return sample(name, **labels) - self.before[key]


@pytest.fixture
def failing() -> Iterator[None]:
    async def fail(platform: Platform, event: dict[str, Any]) -> None:
        raise ValueError("nope")

    handlers.register("test-failing", fail)
    yield
    handlers.unregister("test-failing")


async def test_webhook_and_job_metrics_move(
    client: httpx.AsyncClient, account: Account, failing: None, worker: None
) -> None:
    good = await create_source(client, account, body_limit_bytes=100)
    bad = await create_source(client, account, handler="test-failing", max_attempts=2)
    received = "webhooks_received_total"
    counters = Counters(
        *((received, {"source": good["id"], "result": r}) for r in ("accepted", "duplicate")),
        *(
            (received, {"source": good["id"], "result": r})
            for r in ("invalid_signature", "too_large")
        ),
        (received, {"source": "_unknown", "result": "not_found"}),
        ("jobs_created_total", {}),
        ("jobs_processed_total", {"status": "succeeded"}),
        ("jobs_processed_total", {"status": "retrying"}),
        ("jobs_processed_total", {"status": "dead"}),
        ("job_retries_total", {}),
        ("dlq_messages_total", {}),
        ("job_processing_duration_seconds_count", {}),
    )
    accepted = await deliver(client, good, b'{"a": 1}', msg_id="d-1")
    await deliver(client, good, b'{"a": 1}', msg_id="d-1")
    await deliver(client, good, b'{"a": 2}', secret="wrong")
    await deliver(client, good, b'{"a": "' + b"x" * 200 + b'"}')
    await client.post("/v1/ingest/src_01jd000000000000000000000a", content=b"{}")
    failed = await deliver(client, bad, b'{"b": 1}')
    await wait_for_job(client, account, accepted.json()["event_id"], "succeeded")
    await wait_for_job(client, account, failed.json()["event_id"], "dead")

    assert counters.delta(received, source=good["id"], result="accepted") == 1
    assert counters.delta(received, source=good["id"], result="duplicate") == 1
    assert counters.delta(received, source=good["id"], result="invalid_signature") == 1
    assert counters.delta(received, source=good["id"], result="too_large") == 1
    assert counters.delta(received, source="_unknown", result="not_found") == 1
    assert counters.delta("jobs_created_total") == 2
    assert counters.delta("jobs_processed_total", status="succeeded") == 1
    assert counters.delta("jobs_processed_total", status="retrying") == 1
    assert counters.delta("jobs_processed_total", status="dead") == 1
    assert counters.delta("job_retries_total") == 1
    assert counters.delta("dlq_messages_total") == 1
    assert counters.delta("job_processing_duration_seconds_count") == 3
    scrape = await client.get("/metrics")
    for name in (received, "jobs_created_total", "outbox_pending", "dlq_messages_total"):
        assert name in scrape.text


@pytest.mark.parametrize("settings_overrides", [{"outbox": {"poll_interval_ms": 3_600_000}}])
async def test_outbox_pending_gauge_follows_the_outbox(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    # The relay's next poll is an hour away, so the three rows stay pending.
    source = await create_source(client, account)
    for n in range(3):
        assert (await deliver(client, source, b'{"n": %d}' % n)).status_code == 202
    await tick(platform)
    assert await pending_count(platform.db) == 3
    assert sample("outbox_pending") == 3


HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=200,
)
HEADER_VALUES = st.one_of(
    HEADER_TEXT,
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.builds(lambda t, s: f"t={t},v1={s}", st.integers(), HEADER_TEXT),
    st.builds(lambda s: "sha256=" + s, st.from_regex(r"[0-9a-fA-F]{0,80}", fullmatch=True)),
    st.builds(lambda s: "v0=" + s, HEADER_TEXT),
    st.builds(lambda s: "v1," + s, st.from_regex(r"[A-Za-z0-9+/=]{0,60}", fullmatch=True)),
    st.lists(st.sampled_from(["v1,", "v1a,", " ", "=", ",", "abc"]), max_size=20).map("".join),
)
SIGNATURE_HEADERS = [
    "x-hub-signature-256",
    "x-github-delivery",
    "stripe-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "x-shopify-hmac-sha256",
    "x-slack-signature",
    "x-slack-request-timestamp",
    "x-sig",
    "x-sig-ts",
    "content-length",
]


@pytest.fixture
async def every_scheme(client: httpx.AsyncClient, account: Account) -> list[dict[str, Any]]:
    sources = []
    for scheme in signatures.SCHEMES:
        extra: dict[str, Any] = {}
        if scheme == "hmac":
            extra = {"hmac": {"header": "x-sig", "timestamp_header": "x-sig-ts", "prefix": "v="}}
        sources.append(await create_source(client, account, scheme=scheme, **extra))
    return sources


@pytest.mark.parametrize("settings_overrides", [{"ratelimit": {"enabled": False}}])
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.data(),
    headers=st.dictionaries(st.sampled_from(SIGNATURE_HEADERS), HEADER_VALUES, max_size=6),
    body=st.binary(max_size=300),
)
async def test_malformed_signature_headers_never_give_a_500(
    client: httpx.AsyncClient,
    every_scheme: list[dict[str, Any]],
    data: st.DataObject,
    headers: dict[str, str],
    body: bytes,
) -> None:
    source = data.draw(st.sampled_from(every_scheme))
    try:
        response = await client.post(source["ingest_url"], content=body, headers=headers)
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return  # a header httpx itself will not send
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_problem(response, response.status_code)
    if response.status_code == 401:
        assert response.json()["reason"] in {
            "missing-signature",
            "malformed-signature",
            "bad-signature",
            "missing-timestamp",
            "stale-timestamp",
        }
