"""The platform's HTTP behaviour end to end: limits, hardening headers, metrics, 500s."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from fastapi import FastAPI, Request
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.requests import ClientDisconnect

from relayport.app import create_app
from relayport.settings import Settings
from tests.conftest import api_key, signup
from tests.core.test_auth import assert_problem

ClientFactory = Callable[..., Any]


@pytest.fixture
def make_client(settings_kwargs: dict[str, Any]) -> ClientFactory:
    """An app client whose settings differ from the defaults by `overrides`."""

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(Settings(**{**settings_kwargs, **overrides}))
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
            transport = httpx.ASGITransport(
                app=app, client=("198.51.100.9", 1234), raise_app_exceptions=False
            )
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client

    return factory


async def test_principal_bucket_gives_429_with_ratelimit_headers(
    make_client: ClientFactory,
) -> None:
    limits = {"principal_requests_per_second": 0.01, "principal_burst": 4}
    async with make_client(ratelimit=limits) as client:
        account = await signup(client)
        statuses = []
        for _ in range(6):
            response = await client.get("/v1/ping", headers=account.headers)
            statuses.append(response.status_code)
        assert statuses == [200, 200, 200, 200, 429, 429]
        assert_problem(response, 429, "rate-limited")
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers["RateLimit-Remaining"] == "0"
        assert response.headers["RateLimit-Limit"] == "4"
        # Another principal of the same tenant has its own bucket.
        other = {"Authorization": f"Bearer {await api_key(client, await signup(client))}"}
        assert (await client.get("/v1/ping", headers=other)).status_code == 200


async def test_successful_responses_carry_ratelimit_headers(make_client: ClientFactory) -> None:
    async with make_client() as client:
        account = await signup(client)
        response = await client.get("/v1/ping", headers=account.headers)
        assert response.status_code == 200
        assert int(response.headers["RateLimit-Remaining"]) < int(
            response.headers["RateLimit-Limit"]
        )


async def test_tenant_daily_quota_is_enforced(make_client: ClientFactory) -> None:
    plans = {"free": {"requests_per_second": 1000, "burst": 1000, "daily_quota": 3}}
    async with make_client(ratelimit={"plans": plans}) as client:
        account = await signup(client)
        key = {"Authorization": f"Bearer {await api_key(client, account)}"}  # 1 request
        assert (await client.get("/v1/ping", headers=key)).status_code == 200
        assert (await client.get("/v1/ping", headers=account.headers)).status_code == 200
        refused = await client.get("/v1/ping", headers=key)
        assert_problem(refused, 429, "quota-exceeded")
        assert 0 < int(refused.headers["Retry-After"]) <= 86_400


async def test_ip_bucket_refuses_before_authentication(make_client: ClientFactory) -> None:
    limits = {"ip_requests_per_second": 0.01, "ip_burst": 3}
    async with make_client(ratelimit=limits) as client:
        codes = [(await client.get("/v1/ping")).status_code for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        assert (await client.get("/healthz")).status_code == 200  # probes are exempt


async def test_cached_credentials_cost_one_limiter_call_per_request(
    make_client: ClientFactory,
) -> None:
    """Once the key is cached, the IP, principal, tenant and quota limits are one atomic call
    (one Redis round trip on the shared backend). The limiter is wrapped to count calls: a
    spy around the real limiter, which still decides."""
    async with make_client() as client:
        account = await signup(client)
        key = {"Authorization": f"Bearer {await api_key(client, account)}"}
        assert (await client.get("/v1/ping", headers=key)).status_code == 200  # now cached
        limiter = client.app.state.platform.limiter  # type: ignore[attr-defined]
        calls: list[list[str]] = []
        real_check, real_hit = limiter.check, limiter.hit

        async def check(limits: Any) -> Any:
            calls.append([limit.key.split(":")[0] for limit in limits])
            return await real_check(limits)

        async def hit(key: str, **kwargs: Any) -> Any:
            calls.append([key.split(":")[0]])
            return await real_hit(key, **kwargs)

        limiter.check, limiter.hit = check, hit
        try:
            for _ in range(3):
                response = await client.get("/v1/ping", headers=key)
                assert response.status_code == 200
                assert "RateLimit-Remaining" in response.headers
        finally:
            limiter.check, limiter.hit = real_check, real_hit
        assert calls == [["ip", "p", "t", "q"]] * 3


async def test_refused_cached_principal_is_429_before_routing(make_client: ClientFactory) -> None:
    limits = {"principal_requests_per_second": 0.01, "principal_burst": 2}
    async with make_client(ratelimit=limits) as client:
        account = await signup(client)
        assert (await client.get("/v1/ping", headers=account.headers)).status_code == 200
        codes = [
            (await client.get("/v1/no-such-route", headers=account.headers)).status_code
            for _ in range(2)
        ]
        # Valid (cached) credentials count even where a route does not exist or need them.
        assert codes == [404, 429]


async def test_request_id_and_security_headers(client: httpx.AsyncClient) -> None:
    sane = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert sane.headers["X-Request-ID"] == "abc-123"
    odd = await client.get("/healthz", headers={"X-Request-ID": "<script>" + "x" * 300})
    assert odd.headers["X-Request-ID"] not in ("", "<script>" + "x" * 300)
    assert sane.headers["X-Content-Type-Options"] == "nosniff"
    assert sane.headers["X-Frame-Options"] == "DENY"
    assert "default-src 'none'" in sane.headers["Content-Security-Policy"]
    problem = await client.get("/v1/me")
    assert problem.headers["X-Request-ID"]


async def test_swagger_ui_and_openapi_are_served(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/auth/signup" in spec["paths"]


async def test_cors_allows_only_listed_origins(make_client: ClientFactory) -> None:
    async with make_client(http={"cors_origins": ["https://app.example"]}) as client:
        preflight = {"Access-Control-Request-Method": "GET"}
        ok = await client.options("/v1/me", headers={"Origin": "https://app.example", **preflight})
        assert ok.headers.get("access-control-allow-origin") == "https://app.example"
        bad = await client.options(
            "/v1/me", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in bad.headers


async def test_concurrency_limit_sheds_load_with_503(make_client: ClientFactory) -> None:
    async with make_client(http={"max_concurrency": 1, "concurrency_retry_after_s": 2}) as client:
        gate = asyncio.Event()
        entered = asyncio.Event()
        app = client.app  # type: ignore[attr-defined]

        @app.get("/test-hold")
        async def hold() -> dict[str, bool]:
            entered.set()
            await gate.wait()
            return {"ok": True}

        held = asyncio.create_task(client.get("/test-hold"))
        await asyncio.wait_for(entered.wait(), 10)
        shed = await client.get("/v1/ping")
        assert_problem(shed, 503)
        assert shed.headers["Retry-After"] == "2"
        assert (await client.get("/healthz")).status_code == 200
        gate.set()
        assert (await held).status_code == 200


async def test_metrics_use_route_templates(client: httpx.AsyncClient) -> None:
    account = await signup(client)
    await client.get(f"/v1/users/{account.user_id}", headers=account.headers)
    text = (await client.get("/metrics")).text
    assert "http_requests_total{" in text
    assert 'route="/v1/users/{user_id}"' in text
    assert account.user_id not in text
    assert "http_request_duration_seconds_bucket" in text


async def test_unhandled_error_is_a_problem_and_logged_with_request_id(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_client() as client:
        app = client.app  # type: ignore[attr-defined]

        @app.get("/test-boom")
        async def boom() -> None:
            raise RuntimeError("secret internals")

        with caplog.at_level(logging.ERROR, logger="relayport.errors"):
            response = await client.get("/test-boom", headers={"X-Request-ID": "req-500"})
        assert_problem(response, 500, "internal-error")
        assert "secret internals" not in response.text
        assert "Traceback" not in response.text
        assert response.json()["request_id"] == "req-500"
        [record] = [r for r in caplog.records if r.name == "relayport.errors"]
        assert getattr(record, "request_id", None) == "req-500"


async def test_readyz_reports_every_dependency(client: httpx.AsyncClient, backend: str) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    checks = response.json()["checks"]
    expected = {"database", "migrations", "broker", "pubsub"}
    if backend == "postgres":
        expected.add("redis")
    assert set(checks) == expected
    assert set(checks.values()) == {"ok"}


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256"])
async def test_asymmetric_jwt_algorithms(
    make_client: ClientFactory, tmp_path: Path, algorithm: str
) -> None:
    key: Any = (
        ed25519.Ed25519PrivateKey.generate()
        if algorithm == "EdDSA"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    auth = {"jwt_algorithm": algorithm, "jwt_private_key_file": str(pem), "jwt_kid": "k9"}
    async with make_client(auth=auth) as client:
        account = await signup(client)
        header = jwt.get_unverified_header(account.access_token)
        assert header["alg"] == algorithm
        assert header["kid"] == "k9"
        # Anyone holding the public key can verify the token.
        claims = jwt.decode(
            account.access_token, key.public_key(), algorithms=[algorithm], issuer="relayport"
        )
        assert claims["sub"] == account.user_id
        assert (await client.get("/v1/me", headers=account.headers)).status_code == 200
        # An HS256 token signed with the public key's bytes (algorithm confusion) is refused.
        forged = jwt.encode(
            {**claims, "role": "admin"}, "x" * 64, algorithm="HS256", headers={"kid": "k9"}
        )
        refused = await client.get("/v1/me", headers={"Authorization": f"Bearer {forged}"})
        assert_problem(refused, 401, "invalid-token")


async def test_backing_service_outage_is_503_not_500(make_client: ClientFactory) -> None:
    """The route raises what redis-py and SQLAlchemy raise when Redis or the database pool
    is out of reach (simulated: taking the real services down would break the other tests)."""
    async with make_client() as client:
        app = client.app  # type: ignore[attr-defined]

        @app.get("/test-redis-down")
        async def redis_down() -> None:
            raise RedisConnectionError("No connection available.")

        @app.get("/test-db-pool-exhausted")
        async def db_down() -> None:
            raise SATimeoutError("QueuePool limit reached")

        for path in ("/test-redis-down", "/test-db-pool-exhausted"):
            response = await client.get(path)
            assert_problem(response, 503, "unavailable")
            assert response.headers["Retry-After"] == "1"


async def test_client_disconnect_is_not_logged_as_a_server_error(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_client() as client:
        app = client.app  # type: ignore[attr-defined]

        @app.post("/test-read-body")
        async def read_body(request: Request) -> None:
            raise ClientDisconnect()

        with caplog.at_level(logging.INFO, logger="relayport.errors"):
            response = await client.post("/test-read-body", content=b"x")
        assert_problem(response, 400, "client-disconnected")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_database_restart_costs_at_most_one_503_then_serves(
    make_client: ClientFactory, postgres_admin_url: str
) -> None:
    """Pooled connections are not pre-pinged: when PostgreSQL drops them (as on a restart,
    here by terminating this database's backends), the next request on a stale connection
    is a 503 with Retry-After, never a 500, and the pool heals for the ones after."""
    import asyncpg

    async with make_client() as client:
        account = await signup(client)
        key = {"Authorization": f"Bearer {await api_key(client, account)}"}
        for path in ("/v1/api-keys", "/v1/me"):  # warm both the read and the write pools
            assert (await client.get(path, headers=key)).status_code == 200
        database = client.app.state.platform.db.engine.url.database  # type: ignore[attr-defined]
        admin = await asyncpg.connect(postgres_admin_url)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        finally:
            await admin.close()
        statuses = [(await client.get("/v1/api-keys", headers=key)).status_code for _ in range(4)]
        assert 500 not in statuses, statuses
        assert statuses[-1] == 200, statuses
        assert statuses.count(503) <= 1, statuses


async def test_a_closed_database_reader_is_a_503_not_a_500(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """The driver reads of the hottest GET routes (core.fastread) answer 503 + Retry-After
    when the database cannot (here: the reader is closed, as during shutdown)."""
    account = await signup(client)
    key = {"Authorization": f"Bearer {await api_key(client, account)}"}
    assert (await client.get("/v1/api-keys", headers=key)).status_code == 200
    await app.state.platform.db.driver.close()
    response = await client.get("/v1/api-keys", headers=key)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"


async def test_list_routes_document_their_paging_parameters(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in ("/v1/api-keys", "/v1/users"):
        operation = spec["paths"][path]["get"]
        params = {p["name"]: p for p in operation["parameters"]}
        assert set(params) == {"limit", "after"}
        assert params["limit"]["in"] == "query"
        assert params["limit"]["schema"]["minimum"] == 1
        assert params["limit"]["schema"]["maximum"] == 200
        assert params["limit"]["schema"]["default"] == 50
        assert {"maxLength": 64, "type": "string"} in params["after"]["schema"]["anyOf"]
        assert "422" in operation["responses"]
