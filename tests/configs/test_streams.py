"""Push streams under pressure, through real `relayport serve` processes and real sockets:
stalled readers, vanished instances, rate limits on the client routes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from pydantic import ValidationError
from websockets.exceptions import InvalidStatus

from relayport.settings import Settings
from tests.configs.conftest import Server, start
from tests.configs.helpers import client_key, env_path, environment, project, put
from tests.conftest import Account, signup

BIG = "x" * 200_000  # per write: a stalled reader's socket buffers fill within a few writes


async def _setup(server: Server) -> tuple[httpx.AsyncClient, Account, str, str]:
    http = httpx.AsyncClient(base_url=server.url, timeout=10)
    account = await signup(http)
    pid = await project(http, account)
    base = env_path(pid, await environment(http, account, pid, "prod"))
    return http, account, base, await client_key(http, account, base)


def _stalled_reader(server: Server, key: str, transport: str) -> socket.socket:
    """A subscriber that connects, gets its first bytes, and then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.connect(("127.0.0.1", server.port))
    lines = ["GET /v1/client/stream?since=0 HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
             f"Authorization: Bearer {key}"]  # fmt: skip
    if transport == "websocket":
        lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                  f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"]  # fmt: skip
    else:
        lines.append("Accept: text/event-stream")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sock.settimeout(10)
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101" if transport == "websocket" else b"HTTP/1.1 200")
    return sock


def _slow_total(metrics: str) -> float:
    match = re.search(r"^relayport_config_slow_consumers_total (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_stalled_reader_is_cut_off_while_the_others_keep_receiving(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path, transport: str
) -> None:
    server = start(
        settings_kwargs,
        tmp_path,
        RELAYPORT_CONFIGS__SUBSCRIBER_BUFFER_BYTES="65536",
        RELAYPORT_CONFIGS__SLOW_CLOSE_TIMEOUT_S="1",
    )
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "big", {"value": "start"})
    stalled = await asyncio.to_thread(_stalled_reader, server, key, transport)
    async with websockets.connect(
        f"{server.ws}/v1/client/stream?since=1",
        additional_headers={"Authorization": f"Bearer {key}"},
        max_size=2**24,
    ) as reader:
        # Far more than the socket buffers of the stalled reader can take (4 MiB at most
        # on the server's side here, plus its 64 KiB bound); the healthy reader takes all.
        for n in range(40):
            await put(http, account, base, "big", {"value": f"{n}{BIG}"})
            while True:
                message = json.loads(await asyncio.wait_for(reader.recv(), 10))
                if message["type"] == "patch":
                    break
            assert message["revision"] == n + 2
        metrics = (await http.get("/metrics")).text
        assert _slow_total(metrics) >= 1
    # Cut off: within the close timeout its connection ends (a close it never read, then an
    # abort), so the server holds neither the stream nor its buffer.

    def drained() -> bool:
        stalled.settimeout(15)
        try:
            while stalled.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        return True

    assert await asyncio.to_thread(drained)
    stalled.close()
    await http.aclose()


async def test_a_client_of_a_vanished_instance_stops_counting_as_connected(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    # Heartbeat 1 s (the fixture's), expiry after 2 missed confirmations.
    extra = {"RELAYPORT_CONFIGS__CONNECTED_EXPIRY_BEATS": "2"}
    doomed = start(settings_kwargs, tmp_path, **extra)
    servers.append(doomed)
    http, account, base, key = await _setup(doomed)
    await put(http, account, base, "a", {"value": 1})

    async def clients(via: Server) -> list[dict[str, Any]]:
        r = await http.get(f"{via.url}{base}/clients", headers=account.headers)
        return list(r.json()["data"])

    async with websockets.connect(
        f"{doomed.ws}/v1/client/stream?since=0&client=pod-1",
        additional_headers={"Authorization": f"Bearer {key}"},
    ) as ws:
        await ws.recv()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not [c for c in await clients(doomed) if c["connected"]]:
            assert loop.time() < deadline, "the client never showed as connected"
            await asyncio.sleep(0.05)
        # Still connected after several expiry periods: its instance keeps confirming it.
        await asyncio.sleep(3)
        assert [c["connected"] for c in await clients(doomed)] == [True]
        # The instance dies without a word: nothing marks the client disconnected.
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
    survivor = start(settings_kwargs, tmp_path, **extra)
    servers.append(survivor)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        listed = await clients(survivor)
        if listed and not listed[0]["connected"]:
            break
        assert asyncio.get_running_loop().time() < deadline, listed
        await asyncio.sleep(0.2)
    prop = (
        await http.get(f"{survivor.url}{base}/versions/1/propagation", headers=account.headers)
    ).json()
    assert prop["connected"] == 0
    await http.aclose()


async def test_client_routes_and_websocket_connects_are_rate_limited_per_client_key(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(
        settings_kwargs,
        tmp_path,
        RELAYPORT_CONFIGS__CLIENT_KEY_REQUESTS_PER_SECOND="0.01",
        RELAYPORT_CONFIGS__CLIENT_KEY_BURST="3",
    )
    servers.append(server)
    http, account, base, key = await _setup(server)
    other = await client_key(http, account, base)
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        assert (await http.get("/v1/client/config", headers=auth)).status_code == 200
    refused = await http.get("/v1/client/config", headers=auth)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["status"] == 429
    assert int(refused.headers["retry-after"]) >= 1
    acks = await http.post("/v1/client/acks", json={"client": "a", "revision": 1}, headers=auth)
    assert acks.status_code == 429
    with pytest.raises(InvalidStatus) as refusal:
        await websockets.connect(f"{server.ws}/v1/client/stream", additional_headers=auth)
    assert refusal.value.response.status_code == 429
    assert b'"status":429' in refusal.value.response.body
    # Another key of the same environment has its own budget.
    async with websockets.connect(
        f"{server.ws}/v1/client/stream?since=0",
        additional_headers={"Authorization": f"Bearer {other}"},
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
    await http.aclose()


def test_several_server_processes_without_redis_are_refused() -> None:
    # In-process pub/sub would carry a change only to the process that committed it.
    with pytest.raises(ValidationError, match="RELAYPORT_REDIS_URL"):
        Settings(
            _env_file=None,  # type: ignore[call-arg]
            workers=2,
            database_url="postgresql+asyncpg://u@127.0.0.1/db",
            broker_url="amqp://guest:guest@127.0.0.1:5672/",
        )


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_server_with_several_worker_processes_pushes_to_every_subscriber(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    # Heartbeats (and the periodic sync that comes with them) are a minute apart: only the
    # announcement through Redis can bring the change to the other process in time.
    server = start(
        settings_kwargs,
        tmp_path,
        RELAYPORT_WORKERS="2",
        RELAYPORT_CONFIGS__HEARTBEAT_INTERVAL_S="60",
    )
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "n", {"value": 1})
    auth = {"Authorization": f"Bearer {key}"}
    # Enough connections that the kernel hands some to each process.
    streams = [
        await websockets.connect(f"{server.ws}/v1/client/stream?since=1", additional_headers=auth)
        for _ in range(24)
    ]
    try:
        await put(http, account, base, "n", {"value": 2})
        for ws in streams:
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if message["type"] == "patch":
                    break
            assert message["revision"] == 2
    finally:
        for ws in streams:
            await ws.close()
        await http.aclose()


async def test_an_idle_sse_stream_gets_heartbeats_without_ids(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)  # heartbeat every second
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "a", {"value": 1})
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=10) as sse,
        sse.stream("GET", f"{server.url}/v1/client/stream?since=1", headers=headers) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]  # the headers still pass the middleware
        async for line in response.aiter_lines():
            lines.append(line)
            if line == "event: heartbeat":
                break
    assert lines[0] == ": connected"
    assert not [line for line in lines if line.startswith("id:")]
    await http.aclose()
