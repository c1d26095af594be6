"""The ingest route's one limiter call: the client IP's bucket is spent together with the
source's limits, still before the body is read, the signature checked or (for a source not
cached yet) the database read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from relayport.core.ids import new_id
from relayport.core.platform import Platform
from relayport.core.ratelimit import Decision, Limit
from relayport.ingest.models import Rejection
from relayport.ingest.sources_cache import source_cache
from tests.conftest import Account
from tests.core.test_auth import assert_problem
from tests.ingest.conftest import create_source, deliver

FLOOD_IP = "198.51.100.23"


class CountingLimiter:
    """Wraps the platform's limiter and records the keys of every `check()` call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def check(self, limits: Sequence[Limit]) -> list[Decision]:
        self.calls.append([limit.key for limit in limits])
        result: list[Decision] = await self.inner.check(limits)
        return result


@pytest.fixture
def counting(platform: Platform) -> CountingLimiter:
    limiter = CountingLimiter(platform.limiter)
    platform.limiter = limiter  # type: ignore[assignment]
    return limiter


@pytest.fixture
async def flood_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client from another address, with its own IP bucket."""
    transport = httpx.ASGITransport(app=app, client=(FLOOD_IP, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_a_delivery_makes_one_limiter_call_with_the_ip_bucket(
    client: httpx.AsyncClient, account: Account, counting: CountingLimiter
) -> None:
    source = await create_source(client, account)
    first = await deliver(client, source, b'{"n": 1}')  # loads the source into the cache
    assert first.status_code == 202, first.text
    counting.calls.clear()
    second = await deliver(client, source, b'{"n": 2}')
    assert second.status_code == 202, second.text
    assert counting.calls == [
        [
            "ip:203.0.113.7",
            f"is:{source['id']}",
            f"it:{account.tenant_id}",
            f"q:{account.tenant_id}",
        ]
    ]
    # The answer carries the tightest of the source's limits, never the IP bucket's.
    assert int(second.headers["ratelimit-limit"]) != 400


async def test_a_source_not_cached_spends_the_ip_bucket_before_the_lookup(
    client: httpx.AsyncClient, account: Account, counting: CountingLimiter, platform: Platform
) -> None:
    source = await create_source(client, account)
    source_cache(platform).forget(source["id"])
    counting.calls.clear()
    response = await deliver(client, source, b'{"n": 1}')
    assert response.status_code == 202, response.text
    assert [keys[0] for keys in counting.calls] == ["ip:203.0.113.7", f"is:{source['id']}"]
    assert len(counting.calls[1]) == 3  # the source's limits, without the IP bucket again


@pytest.mark.parametrize(
    "settings_overrides", [{"ratelimit": {"ip_requests_per_second": 0.001, "ip_burst": 3}}]
)
async def test_a_flood_of_bad_signatures_is_refused_by_the_ip_bucket_before_verification(
    client: httpx.AsyncClient,
    flood_client: httpx.AsyncClient,
    account: Account,
    platform: Platform,
) -> None:
    # Set up from the usual address (which has its own bucket), then flood from another one.
    source = await create_source(client, account)
    statuses = []
    for n in range(6):
        response = await deliver(flood_client, source, b'{"n": %d}' % n, secret="whsec-wrong")
        statuses.append(response.status_code)
    assert statuses == [401, 401, 401, 429, 429, 429]
    refused = await deliver(flood_client, source, b'{"n": 9}', secret="whsec-wrong")
    assert_problem(refused, 429, "rate-limited")
    assert int(refused.headers["retry-after"]) >= 1
    # Refused before verification: only the first three reached the rejection log.
    async with platform.db.sessions() as session:
        kept = await session.scalar(select(func.count()).select_from(Rejection))
    assert kept == 3


@pytest.mark.parametrize(
    "settings_overrides", [{"ratelimit": {"ip_requests_per_second": 0.001, "ip_burst": 2}}]
)
async def test_unknown_source_ids_spend_the_ip_bucket(
    flood_client: httpx.AsyncClient, counting: CountingLimiter
) -> None:
    urls = [
        f"/v1/ingest/{new_id('src')}",  # well-formed, unknown: a database read
        "/v1/ingest/not-an-id",
        f"/v1/ingest/{new_id('src')}",
    ]
    statuses = [(await flood_client.post(url, content=b"{}")).status_code for url in urls]
    assert statuses == [404, 404, 429]
    assert all(keys == [f"ip:{FLOOD_IP}"] for keys in counting.calls)


async def test_credentials_on_an_ingest_request_are_charged_by_the_middleware_once(
    client: httpx.AsyncClient, account: Account, counting: CountingLimiter
) -> None:
    # A request with credentials the authenticator has cached is charged by the middleware
    # (IP + principal, as on any route); the route then spends only the source's limits.
    source = await create_source(client, account)
    assert (await deliver(client, source, b'{"n": 1}')).status_code == 202
    counting.calls.clear()
    response = await deliver(client, source, b'{"n": 2}', headers=account.headers)
    assert response.status_code == 202, response.text
    ip_calls = [keys for keys in counting.calls if any(k.startswith("ip:") for k in keys)]
    assert len(ip_calls) == 1
    assert ip_calls[0][1].startswith("p:")
    assert counting.calls[-1][0] == f"is:{source['id']}"
