"""Helpers for outbound-webhook tests: real receivers (uvicorn on loopback, port 0) that can be
told to succeed, fail, hang, answer 429 with Retry-After, 410, or reset the connection; quick
worker settings (retries in tens of milliseconds) and an allow-list for loopback targets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from relayport.core.platform import Platform
from relayport.worker import Worker
from tests.conftest import Account

FAST_SCHEDULE = [0, 0.05, 0.05, 0.05]


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
        "delivery": {
            "allow_cidrs": ["127.0.0.0/8"],
            "retry_schedule_s": FAST_SCHEDULE,
            "retry_jitter": 0.0,
            "scheduler_interval_s": 0.05,
            "total_timeout_s": 2,
            "connect_timeout_s": 2,
            "lease_s": 10,
        },
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
    """The app runs the worker itself on the embedded default; on PostgreSQL + RabbitMQ the
    test process starts one, as `relayport worker` would."""
    if platform.settings.embedded:
        yield
        return
    running = Worker(platform)
    await running.start()
    try:
        yield
    finally:
        await running.stop(5)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An ASGI app recording every request; `script[path]` is a list of behaviours played in
    turn (the last one repeats): "ok", "fail", "hang", "429:<retry-after>", "410", "redirect"."""

    base: str = ""
    received: list[Received] = field(default_factory=list)
    script: dict[str, list[str]] = field(default_factory=dict)

    def url(self, path: str = "/ok") -> str:
        return self.base + path

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        path = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append(Received(path, headers, body, time.monotonic()))
        plan = self.script.get(path) or [path.strip("/").split("/")[0] or "ok"]
        seen = len(self.at(path)) - 1
        action = plan[min(seen, len(plan) - 1)]
        status, extra = 200, []
        if action == "fail":
            status = 500
        elif action == "hang":
            await asyncio.sleep(3600)
        elif action.startswith("429"):
            status, extra = 429, [(b"retry-after", action.partition(":")[2].encode() or b"1")]
        elif action == "503":
            status = 503
        elif action == "410":
            status = 410
        elif action == "redirect":
            status, extra = 307, [(b"location", self.url("/ok").encode())]
        elif action == "big":
            body = b"x" * 20_000
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain"), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body if action == "big" else b"seen"})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = Receiver()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    app.base = f"http://127.0.0.1:{port}"
    try:
        yield app
    finally:
        server.should_exit = True
        server.force_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        sock.close()


@pytest.fixture
async def resetter() -> AsyncIterator[str]:
    """A TCP server that resets every connection (SO_LINGER 0) once the request arrives."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(1024)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/reset"
    finally:
        server.close()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll a predicate (sync or async) until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def create_endpoint(
    client: httpx.AsyncClient, account: Account, url: str, **fields: Any
) -> dict[str, Any]:
    response = await client.post(
        "/v1/endpoints", json={"url": url, **fields}, headers=account.headers
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def send_message(
    client: httpx.AsyncClient,
    account: Account,
    event_type: str = "invoice.paid",
    payload: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    response = await client.post(
        "/v1/messages",
        json={"event_type": event_type, "payload": payload or {"n": 1}, **fields},
        headers=account.headers,
    )
    assert response.status_code == 202, response.text
    created: dict[str, Any] = response.json()
    return created


async def message_of(
    client: httpx.AsyncClient, account: Account, message_id: str
) -> dict[str, Any]:
    response = await client.get(f"/v1/messages/{message_id}", headers=account.headers)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def wait_for_delivery(
    client: httpx.AsyncClient,
    account: Account,
    message_id: str,
    status: str,
    *,
    timeout: float = 15.0,
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        message = await message_of(client, account, message_id)
        seen.update(message["deliveries"][0])
        return bool(seen["status"] == status)

    await eventually(reached, timeout=timeout, what=f"delivery of {message_id} to be {status}")
    return seen
