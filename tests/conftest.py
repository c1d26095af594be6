"""Shared fixtures. Every app-level test runs twice:

- `sqlite`: the embedded default (SQLite file, in-process broker, pub/sub and rate limits);
- `postgres`: the scaled-out stack (PostgreSQL, Redis, RabbitMQ), with this run's own database,
  key prefix and vhost.

Each profile migrates once per session with Alembic; tests then start from empty tables (a fresh
copy of the migrated SQLite file, or TRUNCATE on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from relayport.core import migrate
from relayport.core.db import Database
from relayport.settings import Settings

pytest_plugins = ["tests.fixtures.services"]

for _name in [k for k in os.environ if k.startswith("RELAYPORT_") and "_TEST_" not in k]:
    del os.environ[_name]  # a developer's own settings must not leak into the tests


async def _migrate(url: str) -> None:
    db = Database(url)
    try:
        await migrate.upgrade(db)
    finally:
        await db.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "relayport.db"
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def pg_url(postgres_admin_url: str) -> Iterator[str]:
    """This run's own PostgreSQL database, migrated once."""
    name = f"relayport_t_{secrets.token_hex(6)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_admin_url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    parts = urlsplit(postgres_admin_url)
    url = urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", parts.query, ""))
    asyncio.run(_migrate(url))
    try:
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'alembic_version'"
        )
        if tables:
            names = ", ".join(f'"{t["tablename"]}"' for t in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings_kwargs(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings for one test on one backend profile, from empty tables."""
    data_dir = tmp_path / "data"
    kwargs: dict[str, Any] = {
        "env": "test",
        "data_dir": data_dir,
        "auto_migrate": False,
        "_env_file": None,
    }
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(template, data_dir / "relayport.db")
        kwargs["database_url"] = f"sqlite+aiosqlite:///{data_dir / 'relayport.db'}"
    else:
        url: str = request.getfixturevalue("pg_url")
        asyncio.run(_truncate(url))
        redis_url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        kwargs["database_url"] = url
        kwargs["redis_url"] = redis_url
        kwargs["broker_url"] = request.getfixturevalue("amqp_url")
        # Each test gets fresh rate-limit buckets inside this run's prefix.
        kwargs["redis_key_prefix"] = f"{prefix}{secrets.token_hex(4)}:"
    return kwargs


@pytest.fixture
def settings(settings_kwargs: dict[str, Any]) -> Settings:
    return Settings(**settings_kwargs)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    from relayport.app import create_app

    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


class Account:
    """A signed-up user: its tokens, tenant and a ready Authorization header."""

    def __init__(self, body: dict[str, Any], email: str, password: str) -> None:
        self.body = body
        self.email = email
        self.password = password
        self.access_token: str = body["access_token"]
        self.refresh_token: str = body["refresh_token"]
        self.tenant_id: str = body["tenant"]["id"]
        self.user_id: str = body["user"]["id"]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def signup(client: httpx.AsyncClient, tenant_name: str | None = None) -> Account:
    email = f"user-{secrets.token_hex(4)}@example.com"
    password = "correct horse battery staple"
    payload: dict[str, Any] = {"email": email, "password": password}
    if tenant_name:
        payload["tenant_name"] = tenant_name
    response = await client.post("/v1/auth/signup", json=payload)
    assert response.status_code == 201, response.text
    return Account(response.json(), email, password)


async def api_key(client: httpx.AsyncClient, account: Account, role: str = "admin") -> str:
    response = await client.post(
        "/v1/api-keys", json={"name": f"{role} key", "role": role}, headers=account.headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


@pytest.fixture
async def account(client: httpx.AsyncClient) -> Account:
    return await signup(client, "Acme")
