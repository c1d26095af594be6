"""Helpers for the inbound-webhook app tests: sources, signed deliveries, a running worker.

Settings here make the worker quick (scheduler every 50 ms, retries from 20 ms, outbox polled
every 20 ms) so tests can wait for outcomes with short deadlines.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from relayport.core.platform import Platform
from relayport.ingest import signatures
from relayport.worker import Worker
from tests.conftest import Account


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Per-test settings: `@pytest.mark.parametrize("settings_overrides", [{...}])`."""
    return {}


@pytest.fixture
def settings_kwargs(
    settings_kwargs: dict[str, Any], settings_overrides: dict[str, Any]
) -> dict[str, Any]:
    merged: dict[str, Any] = {
        **settings_kwargs,
        "ingest": {"scheduler_interval_s": 0.05, "retry_base_s": 0.02, "retry_cap_s": 0.2},
        "outbox": {"poll_interval_ms": 20},
    }
    for key, value in settings_overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


@pytest.fixture
def platform(app: FastAPI) -> Platform:
    value: Platform = app.state.platform
    return value


@pytest.fixture
async def worker(platform: Platform) -> AsyncIterator[None]:
    """A worker for this test: the app runs one itself on the embedded default; on the
    PostgreSQL + RabbitMQ profile the test process starts one, as `relayport worker` would."""
    if platform.settings.embedded:
        yield
        return
    running = Worker(platform)
    await running.start()
    try:
        yield
    finally:
        await running.stop(5)


async def create_source(
    client: httpx.AsyncClient, account: Account, **fields: Any
) -> dict[str, Any]:
    body = {"name": "provider", "scheme": "github", **fields}
    response = await client.post("/v1/sources", json=body, headers=account.headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def signed_headers(
    source: dict[str, Any],
    body: bytes,
    *,
    secret: str | None = None,
    msg_id: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    hmac = source.get("hmac")
    config = (
        signatures.HmacConfig(
            header=hmac["header"],
            algorithm=hmac["algorithm"],
            encoding=hmac["encoding"],
            prefix=hmac["prefix"],
            timestamp_header=hmac["timestamp_header"],
        )
        if hmac
        else None
    )
    return signatures.sign(
        source["scheme"],
        body,
        secret or source["secrets"][0]["value"],
        now=time.time() if now is None else now,
        msg_id=msg_id,
        hmac_config=config,
    )


async def deliver(
    client: httpx.AsyncClient,
    source: dict[str, Any],
    body: bytes,
    *,
    secret: str | None = None,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> httpx.Response:
    """POST `body` to the source's ingest URL, signed as its provider would sign it."""
    sent = {
        "content-type": content_type,
        **signed_headers(source, body, secret=secret, msg_id=msg_id),
        **(headers or {}),
    }
    return await client.post(source["ingest_url"], content=body, headers=sent)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 15.0,
    what: str = "condition",
) -> None:
    """Poll a predicate (sync or async) until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout

    async def holds() -> bool:
        result = check()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    while not await holds():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def job_of(client: httpx.AsyncClient, account: Account, event_id: str) -> dict[str, Any]:
    response = await client.get("/v1/jobs", params={"limit": 200}, headers=account.headers)
    assert response.status_code == 200, response.text
    jobs = [j for j in response.json()["data"] if j["event_id"] == event_id]
    assert len(jobs) == 1, jobs
    return jobs[0]


async def wait_for_job(
    client: httpx.AsyncClient,
    account: Account,
    event_id: str,
    status: str,
    *,
    timeout: float = 15.0,
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await job_of(client, account, event_id))
        return seen["status"] == status

    await eventually(reached, timeout=timeout, what=f"job of {event_id} to be {status} ({seen})")
    return seen
