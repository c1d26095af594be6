"""POST /v1/ingest/{source_id}: verification on the raw bytes, limits, the rejection log, and
exactly one inbox row + job + outbox row per event, however many times it arrives."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from standardwebhooks import Webhook as StandardWebhook
from svix.webhooks import Webhook as SvixWebhook

from relayport.core.outbox import OutboxMessage
from relayport.core.platform import Platform
from relayport.core.tenants import Tenant
from relayport.ingest.models import InboxEvent, Job, Rejection
from relayport.ingest.signatures import generate_secret
from tests.conftest import Account
from tests.core.test_auth import assert_problem
from tests.ingest.conftest import create_source, deliver, signed_headers

GITHUB_BODY = json.dumps(
    {"action": "opened", "repository": {"full_name": "octo/hello"}, "number": 1}
).encode()


async def _count(platform: Platform, model: Any, *where: Any) -> int:
    async with platform.db.sessions() as session:
        value = await session.scalar(select(func.count()).select_from(model).where(*where))
    return int(value or 0)


async def test_github_delivery_is_stored_with_its_cloudevent_type(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    source = await create_source(client, account, secrets=["It's a Secret to Everybody"])
    response = await deliver(
        client,
        source,
        GITHUB_BODY,
        msg_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        headers={"x-github-event": "issues", "user-agent": "GitHub-Hookshot/abc"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"
    event_id = response.json()["event_id"]
    event = (await client.get(f"/v1/events/{event_id}", headers=account.headers)).json()
    assert event["type"] == "issues.opened"
    assert event["subject"] == "octo/hello"
    assert event["dedup_key"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert event["size"] == len(GITHUB_BODY)
    assert event["body"] == json.loads(GITHUB_BODY)
    # Selected headers are kept; the signature is not.
    assert event["headers"]["x-github-event"] == "issues"
    assert event["headers"]["user-agent"] == "GitHub-Hookshot/abc"
    assert "x-hub-signature-256" not in event["headers"]
    cloudevent = event["cloudevent"]
    assert cloudevent["specversion"] == "1.0"
    assert cloudevent["id"] == event_id
    assert cloudevent["source"] == f"/v1/sources/{source['id']}"
    assert cloudevent["type"] == "issues.opened"
    assert cloudevent["subject"] == "octo/hello"
    assert cloudevent["data"] == json.loads(GITHUB_BODY)
    # One job and one outbox message, named by the job's id.
    async with platform.db.sessions() as session:
        job = (await session.scalars(select(Job).where(Job.event_id == event_id))).one()
        outbox = (
            await session.scalars(select(OutboxMessage).where(OutboxMessage.message_id == job.id))
        ).all()
    assert job.max_attempts == 8
    assert [o.topic for o in outbox] == ["ingest.jobs"]
    assert outbox[0].payload == job.id.encode()


@pytest.mark.parametrize(
    ("scheme", "body", "headers", "expected_type", "content_type"),
    [
        ("stripe", b'{"id": "evt_1", "type": "invoice.paid"}', {}, "invoice.paid", None),
        ("standard", b'{"type": "user.created"}', {}, "user.created", None),
        ("shopify", b'{"id": 7}', {"x-shopify-topic": "orders/create"}, "orders/create", None),
        (
            "slack",
            b"token=x&team_id=T1&command=%2Fdo",
            {},
            "webhook",
            "application/x-www-form-urlencoded",
        ),
        ("hmac", b'{"meta": {"kind": "thing.done"}}', {}, "thing.done", None),
    ],
)
async def test_every_scheme_accepts_its_providers_signature(
    client: httpx.AsyncClient,
    account: Account,
    scheme: str,
    body: bytes,
    headers: dict[str, str],
    expected_type: str,
    content_type: str | None,
) -> None:
    extra: dict[str, Any] = {}
    if scheme == "hmac":
        extra = {
            "hmac": {
                "header": "X-Acme-Signature",
                "algorithm": "sha512",
                "encoding": "base64",
                "prefix": "v1=",
                "timestamp_header": "X-Acme-Timestamp",
            },
            "type_pointer": "/meta/kind",
        }
    source = await create_source(client, account, scheme=scheme, **extra)
    response = await deliver(
        client, source, body, headers=headers, content_type=content_type or "application/json"
    )
    assert response.status_code == 202, response.text
    event = await client.get(f"/v1/events/{response.json()['event_id']}", headers=account.headers)
    assert event.json()["type"] == expected_type
    # A tampered byte, a wrong secret and a stale timestamp are all refused.
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    sent = {"content-type": content_type or "application/json", **signed_headers(source, body)}
    refused = await client.post(source["ingest_url"], content=tampered, headers=sent)
    assert_problem(refused, 401, "invalid-signature")
    assert refused.json()["reason"] == "bad-signature"
    wrong = await deliver(client, source, body, secret=generate_secret(scheme))
    assert_problem(wrong, 401, "invalid-signature")
    if scheme != "shopify":
        stale = signed_headers(source, body, now=time.time() - 3600)
        old = await client.post(source["ingest_url"], content=body, headers=stale)
        assert_problem(old, 401, "invalid-signature")
        assert old.json()["reason"] == "stale-timestamp"


async def test_official_standard_webhooks_and_svix_signatures_are_accepted(
    client: httpx.AsyncClient, account: Account
) -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    source = await create_source(client, account, scheme="standard", secrets=[secret])
    now = dt.datetime.now(dt.UTC)
    body = '{"type": "invoice.paid", "n": 1}'
    signature = StandardWebhook(secret).sign("msg_std_1", now, body)
    headers = {
        "webhook-id": "msg_std_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
    ok = await client.post(source["ingest_url"], content=body, headers=headers)
    assert ok.status_code == 202, ok.text
    svix_body = '{"type": "invoice.paid", "n": 2}'
    svix_headers = {
        "svix-id": "msg_svix_1",
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": SvixWebhook(secret).sign("msg_svix_1", now, svix_body),
        "content-type": "application/json",
    }
    ok = await client.post(source["ingest_url"], content=svix_body, headers=svix_headers)
    assert ok.status_code == 202, ok.text
    # The same webhook-id again is a duplicate, whatever its new signature and timestamp.
    again = await client.post(source["ingest_url"], content=body, headers=headers)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"


async def test_bad_signature_is_401_and_kept_in_the_rejection_log(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    source = await create_source(client, account)
    body = b'{"secret-ish": "payload"}' + b"x" * 2000
    missing = await client.post(
        source["ingest_url"], content=body, headers={"content-type": "application/json"}
    )
    assert_problem(missing, 401, "invalid-signature")
    assert missing.json()["reason"] == "missing-signature"
    malformed = await client.post(
        source["ingest_url"],
        content=body,
        headers={"x-hub-signature-256": "md5=zz", "x-github-event": "push"},
    )
    assert malformed.json()["reason"] == "malformed-signature"
    assert await _count(platform, InboxEvent) == 0
    assert await _count(platform, Job) == 0
    log = await client.get(f"/v1/sources/{source['id']}/rejections", headers=account.headers)
    assert log.status_code == 200
    rows = log.json()["data"]
    assert [r["reason"] for r in rows] == ["malformed-signature", "missing-signature"]
    assert rows[0]["headers"]["x-hub-signature-256"] == "md5=zz"
    assert rows[0]["headers"]["x-github-event"] == "push"
    assert rows[0]["body_size"] == len(body)
    assert rows[0]["body_prefix"] == body[:1024].decode()


async def test_rejection_log_is_bounded_and_expires(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    source = await create_source(client, account)
    for _ in range(105):
        response = await client.post(source["ingest_url"], content=b"{}")
        assert response.status_code == 401
    kept = Rejection.source_id == source["id"]
    assert await _count(platform, Rejection, kept) == 100
    # Rows past 7 days are hidden at once and deleted by the next insert.
    async with platform.db.transaction() as session:
        oldest = await session.scalar(select(func.min(Rejection.id)).where(kept))
        await session.execute(
            update(Rejection)
            .where(Rejection.id == oldest)
            .values(received_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=8))
        )
    page = await client.get(
        f"/v1/sources/{source['id']}/rejections", params={"limit": 200}, headers=account.headers
    )
    assert len(page.json()["data"]) == 99
    await client.post(source["ingest_url"], content=b"{}")
    assert await _count(platform, Rejection, kept) == 99 + 1
    assert await _count(platform, Rejection, Rejection.id == oldest) == 0


async def test_declared_oversize_body_is_413_before_reading(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account, body_limit_bytes=1000)
    body = b'{"a": "' + b"x" * 1000 + b'"}'
    response = await deliver(client, source, body)
    assert_problem(response, 413, "payload-too-large")
    assert response.headers["connection"] == "close"


async def test_streamed_oversize_body_is_cut_off_while_reading(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account, body_limit_bytes=1000)
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b"x" * 300

    headers = signed_headers(source, b"")
    response = await client.post(source["ingest_url"], content=chunks(), headers=headers)
    assert_problem(response, 413, "payload-too-large")
    assert "chunked" in response.request.headers.get("transfer-encoding", "")
    assert sent < 10  # refused at the fourth chunk, not after reading 30 kB


async def test_source_limit_above_the_global_body_limit_is_honoured(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account, body_limit_bytes=3 * 1_048_576)
    body = json.dumps({"blob": "y" * (2 * 1_048_576)}).encode()
    response = await deliver(client, source, body)
    assert response.status_code == 202, response.text


async def test_json_scheme_refuses_a_non_json_body_with_415(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account, scheme="stripe")
    response = await deliver(client, source, b"a=1&b=2", content_type="text/plain")
    assert_problem(response, 415, "unsupported-media-type")


async def test_unknown_and_malformed_source_ids_are_404(client: httpx.AsyncClient) -> None:
    for source_id in ("src_01jd000000000000000000000a", "nope", "src_" + "z" * 40):
        response = await client.post(f"/v1/ingest/{source_id}", content=b"{}")
        assert_problem(response, 404, "not-found")


async def test_duplicate_is_acknowledged_with_the_original_event(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    source = await create_source(client, account, scheme="stripe")
    body = b'{"id": "evt_123", "type": "charge.succeeded"}'
    first = await deliver(client, source, body)
    assert first.status_code == 202
    # Stripe retries an event with a new timestamp and signature: still the same event.
    second = await deliver(client, source, body)
    assert second.status_code == 200
    assert second.json() == {"status": "duplicate", "event_id": first.json()["event_id"]}
    event = await client.get(f"/v1/events/{first.json()['event_id']}", headers=account.headers)
    assert event.json()["duplicate_count"] == 1
    assert await _count(platform, Job) == 1
    # The same body on another source is another event.
    other = await create_source(client, account, scheme="stripe")
    assert (await deliver(client, other, body)).status_code == 202


@pytest.fixture
def settings_kwargs(settings_kwargs: dict[str, Any]) -> dict[str, Any]:
    # 1,000 requests at once from one client address: lift the per-IP and in-flight caps.
    # (Redis connections queue in the platform's blocking pool; a bigger one keeps a loaded
    # CI machine from hitting the pool's wait limit.)
    return {
        "redis_max_connections": 256,
        **settings_kwargs,
        "http": {"max_concurrency": 4096},
        "ratelimit": {"ip_requests_per_second": 100_000, "ip_burst": 100_000},
    }


async def test_a_thousand_concurrent_deliveries_of_one_event_make_one_job(
    client: httpx.AsyncClient, platform: Platform, account: Account
) -> None:
    async with platform.db.transaction() as session:
        await session.execute(
            update(Tenant).where(Tenant.id == account.tenant_id).values(plan="enterprise")
        )
    source = await create_source(client, account)
    body = GITHUB_BODY
    headers = {
        "content-type": "application/json",
        **signed_headers(source, body, msg_id="delivery-1"),
    }
    responses = await asyncio.gather(
        *(client.post(source["ingest_url"], content=body, headers=headers) for _ in range(1000))
    )
    statuses = [r.status_code for r in responses]
    assert statuses.count(202) == 1, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(200) == 999
    [event_id] = {r.json()["event_id"] for r in responses}
    assert await _count(platform, Job) == 1
    assert await _count(platform, InboxEvent) == 1
    event = await client.get(f"/v1/events/{event_id}", headers=account.headers)
    assert event.json()["duplicate_count"] == 999


@pytest.mark.parametrize(
    "settings_overrides",
    [{"ingest": {"source_burst": 3, "source_requests_per_second": 0.001}}],
)
async def test_source_limits_refuse_with_429(client: httpx.AsyncClient, account: Account) -> None:
    source = await create_source(client, account)
    statuses = [(await deliver(client, source, b'{"n": %d}' % n)).status_code for n in range(5)]
    assert statuses == [202, 202, 202, 429, 429]
    refused = await deliver(client, source, b'{"n": 9}')
    assert_problem(refused, 429, "rate-limited")
    assert int(refused.headers["retry-after"]) >= 1
    # Another source of the same tenant has its own bucket.
    other = await create_source(client, account)
    assert (await deliver(client, other, b'{"n": 1}')).status_code == 202
