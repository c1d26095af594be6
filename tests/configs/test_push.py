"""Live push through real `relayport serve` processes and real clients (httpx-sse, websockets)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from relayport.configs import documents as docs
from tests.configs.conftest import Server, start
from tests.configs.helpers import client_key, env_path, environment, project, put
from tests.conftest import Account, signup


async def _setup(server: Server) -> tuple[httpx.AsyncClient, Account, str, str]:
    http = httpx.AsyncClient(base_url=server.url, timeout=10)
    account = await signup(http)
    pid = await project(http, account)
    base = env_path(pid, await environment(http, account, pid, "prod"))
    return http, account, base, await client_key(http, account, base)


async def _sse_events(
    url: str, key: str, count: int, headers: dict[str, str] | None = None, **params: Any
) -> list[tuple[str, str, dict[str, Any]]]:
    """The first `count` non-heartbeat events of an SSE stream: (event, id, data)."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    async with (
        httpx.AsyncClient(timeout=10) as http,
        aconnect_sse(
            http,
            "GET",
            f"{url}/v1/client/stream",
            params=params,
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as source,
    ):
        async for sse in source.aiter_sse():
            if sse.event != "heartbeat":
                out.append((sse.event, sse.id, json.loads(sse.data)))
            if len(out) == count:
                return out
    return out


async def test_sse_resumes_with_exactly_the_missed_deltas_or_a_snapshot(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path, RELAYPORT_CONFIGS__RECENT_VERSIONS="3")
    servers.append(server)
    http, account, base, key = await _setup(server)
    for n in range(1, 7):
        r = await put(http, account, base, "n", {"value": n})
        assert r.json()["revision"] == n
    # Revision 4 is within the 3 recent versions: exactly 5 and 6, as deltas.
    events = await _sse_events(server.url, key, 2, headers={"Last-Event-ID": "4"})
    assert [(e, i) for e, i, _ in events] == [("patch", "5"), ("patch", "6")]
    assert events[0][2]["patch"] == [{"op": "replace", "path": "/n", "value": 5}]
    # Revision 1 is too old for the buffer: one snapshot of the head.
    (snapshot,) = await _sse_events(server.url, key, 1, since=1)
    assert snapshot[:2] == ("snapshot", "6")
    assert snapshot[2]["config"] == {"n": 6}

    # Up to date: nothing until the next write, which arrives as its delta.
    async def write_later() -> None:
        await asyncio.sleep(
            0.3
        )  # give the stream time to attach; the assertion does not rely on it
        await put(http, account, base, "n", {"value": 7})

    writer = asyncio.create_task(write_later())
    (live,) = await _sse_events(server.url, key, 1, since=6)
    await writer
    assert live[:2] == ("patch", "7")
    # The chain links: each event names its predecessor's hash.
    assert live[2]["previous"] == snapshot[2]["hash"]
    await http.aclose()


async def test_long_poll_returns_on_change_or_304_after_wait(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "a", {"value": 1})
    auth = {"Authorization": f"Bearer {key}"}
    idle = await http.get("/v1/client/stream", params={"since": 1, "wait": 0.3}, headers=auth)
    assert idle.status_code == 304
    poll = asyncio.create_task(
        http.get("/v1/client/stream", params={"since": 1, "wait": 10}, headers=auth)
    )
    await asyncio.sleep(0.3)
    await put(http, account, base, "a", {"value": 2})
    answer = await poll
    assert answer.status_code == 200
    assert [e["revision"] for e in answer.json()["events"]] == [2]
    config = await http.get("/v1/client/config", headers=auth)
    assert config.json()["config"] == {"a": 2}
    same = await http.get(
        "/v1/client/config", headers={**auth, "If-None-Match": config.headers["etag"]}
    )
    assert same.status_code == 304
    await http.aclose()


async def test_websocket_acks_feed_propagation_and_the_client_list(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "flag", {"value": False})
    async with websockets.connect(
        f"{server.ws}/v1/client/stream?since=0&client=pod-1",
        additional_headers={"Authorization": f"Bearer {key}"},
    ) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "snapshot"
        doc = first["config"]
        await put(http, account, base, "flag", {"value": True})
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if message["type"] == "patch":
                break
        doc = docs.apply_patch(doc, message["patch"])
        assert doc == {"flag": True}
        assert message["revision"] == 2
        await ws.send(json.dumps({"type": "ack", "revision": 2}))
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            prop = (
                await http.get(f"{base}/versions/2/propagation", headers=account.headers)
            ).json()
            done = prop["acked"] == 1 and prop["p50_ms"] is not None
            if done or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert prop["acked"] == 1
        assert prop["connected"] == 1
        assert prop["p50_ms"] is not None
        assert prop["p50_ms"] >= 0
        clients = (await http.get(f"{base}/clients", headers=account.headers)).json()["data"]
        assert [(c["name"], c["revision"], c["transport"]) for c in clients] == [
            ("pod-1", 2, "websocket")
        ]
    await http.aclose()


async def test_a_bad_or_foreign_client_key_sees_nothing(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "mine", {"value": "a"})
    other = await signup(http)
    pid = await project(http, other)
    other_base = env_path(pid, await environment(http, other, pid, "prod"))
    other_key = await client_key(http, other, other_base)
    seen = await http.get("/v1/client/config", headers={"Authorization": f"Bearer {other_key}"})
    assert seen.json()["config"] == {}
    for bad in ("rpc_nope", key + "x", "rp_notaclientkey"):
        r = await http.get("/v1/client/config", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            f"{server.ws}/v1/client/stream", additional_headers={"Authorization": "Bearer rpc_x"}
        ):
            pass
    await http.aclose()


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_write_on_one_instance_reaches_a_subscriber_on_another(
    backend: str, servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    a = start(settings_kwargs, tmp_path)
    b = start(settings_kwargs, tmp_path)
    servers.extend([a, b])
    http, account, base, key = await _setup(a)
    await put(http, account, base, "x", {"value": 0})
    async with websockets.connect(
        f"{b.ws}/v1/client/stream?since=1", additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        # Attached (since=1 is the head, so nothing is sent): prove it with a heartbeat.
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "heartbeat"
        await put(http, account, base, "x", {"value": 1})
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if message["type"] == "patch":
                break
    assert message["revision"] == 2
    assert message["patch"] == [{"op": "replace", "path": "/x", "value": 1}]
    await http.aclose()


async def _revoke_ends_stream(writer: Server, reader: Server) -> None:
    http, account, base, key = await _setup(writer)
    keys = (await http.get(f"{base}/client-keys", headers=account.headers)).json()["data"]
    async with websockets.connect(
        f"{reader.ws}/v1/client/stream?since=0",
        additional_headers={"Authorization": f"Bearer {key}"},
    ) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"
        r = await http.delete(f"{base}/client-keys/{keys[0]['id']}", headers=account.headers)
        assert r.status_code == 204

        async def until_closed() -> None:
            while True:  # heartbeats may come first; the close must follow within the timeout
                await asyncio.wait_for(ws.recv(), 10)

        with pytest.raises(websockets.ConnectionClosed) as closed:
            await until_closed()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4000
    # Refused at once where it was revoked, within the 5 s key cache on other instances.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        refused = await http.get(
            f"{reader.url}/v1/client/config", headers={"Authorization": f"Bearer {key}"}
        )
        if refused.status_code == 401 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert refused.status_code == 401
    await http.aclose()


async def test_revoking_a_client_key_ends_its_streams(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)
    await _revoke_ends_stream(server, server)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_revoking_on_one_instance_ends_streams_on_another(
    backend: str, servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    a = start(settings_kwargs, tmp_path)
    b = start(settings_kwargs, tmp_path)
    servers.extend([a, b])
    await _revoke_ends_stream(a, b)
