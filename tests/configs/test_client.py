"""relayport.client against a real server: verification, callbacks, acks, cache, reconnects."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from relayport.client import AsyncConfigClient, ChainError, ConfigClient
from relayport.client.core import Transport, apply_message, backoff
from tests.configs.conftest import Server, _env, free_port, start
from tests.configs.helpers import client_key, env_path, environment, project, put
from tests.conftest import Account, signup

SECRET_SCHEMA = {"type": "object", "properties": {"pw": {"type": "string", "x-secret": True}}}


async def _setup(
    server: Server, *, secrets: bool = False
) -> tuple[httpx.AsyncClient, Account, str, str]:
    http = httpx.AsyncClient(base_url=server.url, timeout=10)
    account = await signup(http)
    pid = await project(http, account)
    base = env_path(pid, await environment(http, account, pid, "prod"))
    return http, account, base, await client_key(http, account, base, secrets=secrets)


async def test_client_applies_verifies_calls_back_acks_and_restarts_from_cache(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)
    http, account, base, key = await _setup(server, secrets=True)
    await put(http, account, base, "db", {"value": {"pw": "s3cret"}, "schema": SECRET_SCHEMA})
    cache = tmp_path / "cfg.json"
    changes: list[tuple[Any, int]] = []
    async with AsyncConfigClient(server.url, key, name="pod-1", cache_path=cache) as cfg:
        cfg.on_change(lambda old, new, revision: changes.append((new.get("flag"), revision)))
        await cfg.wait_for(1)
        assert cfg.get("db") == {"pw": "s3cret"}  # a secret-reading key, verified by commitments
        await put(http, account, base, "flag", {"value": True})
        await cfg.wait_for(2)
        assert cfg.get("flag") is True
        assert changes == [(None, 1), (True, 2)]
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            prop = (
                await http.get(f"{base}/versions/2/propagation", headers=account.headers)
            ).json()
            if prop["acked"] == 1:
                break
            await asyncio.sleep(0.05)
        assert prop["acked"] == 1
    assert cache.stat().st_mode & 0o777 == 0o600
    # The server logged at DEBUG (SQL parameters included) and still never the secret.
    assert "s3cret" not in server.output()
    assert '"level":"DEBUG"' in server.output()
    # Offline start: nothing listens at this URL, the cache answers.
    offline = AsyncConfigClient("http://127.0.0.1:9", key, cache_path=cache)
    assert offline.revision == 2
    assert offline.get("flag") is True
    # A tampered cache is refused rather than trusted.
    doc = json.loads(cache.read_text())
    doc["config"]["flag"] = False
    cache.write_text(json.dumps(doc))
    assert AsyncConfigClient("http://127.0.0.1:9", key, cache_path=cache).revision == 0
    await http.aclose()


def start_plain_uvicorn(settings_kwargs: dict[str, Any], tmp: Path, ws: str) -> Server:
    """The app behind stock uvicorn: no `relayport.wire` extension, so streams take the
    ASGI path. With `ws="none"`, an upgrade request is answered as a plain GET (as by a proxy
    that strips upgrades), never with 101."""
    port = free_port()
    log = tmp / f"server-uvicorn-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "relayport.app:create_app_from_env",
             "--port", str(port), "--ws", ws, "--loop", "uvloop"],
            env=_env(settings_kwargs, {}), cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(proc, port, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"server never became ready:\n{server.output()}")


async def test_client_falls_back_to_sse_where_websocket_is_unavailable(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start_plain_uvicorn(settings_kwargs, tmp_path, "none")
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "flag", {"value": False})
    async with AsyncConfigClient(server.url, key, name="pod-sse", backoff_base_s=0.05) as cfg:
        await cfg.wait_for(1)
        assert cfg.transport == "sse"
        await put(http, account, base, "flag", {"value": True})
        await cfg.wait_for(2)
        assert cfg.get("flag") is True
        # Acks travel over HTTP and the server lists the client under SSE.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            clients = (await http.get(f"{base}/clients", headers=account.headers)).json()["data"]
            if clients and clients[0]["revision"] == 2:
                break
            assert asyncio.get_running_loop().time() < deadline, clients
            await asyncio.sleep(0.05)
        assert (clients[0]["name"], clients[0]["transport"]) == ("pod-sse", "sse")
    await http.aclose()


async def test_streams_work_on_the_plain_asgi_path_too(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start_plain_uvicorn(settings_kwargs, tmp_path, "websockets-sansio")
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "n", {"value": 1})
    transports: tuple[Transport, ...] = ("websocket", "sse")
    for transport in transports:
        async with AsyncConfigClient(server.url, key, transport=transport) as cfg:
            await cfg.wait_for(1)  # the snapshot of the head
            revision = cfg.revision
            await put(http, account, base, "n", {"value": revision + 1})
            await cfg.wait_for(revision + 1)
            assert cfg.get("n") == revision + 1
    await http.aclose()


async def test_client_on_sse_resumes_from_its_revision(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "n", {"value": 0})
    async with AsyncConfigClient(server.url, key, transport="sse", backoff_base_s=0.05) as cfg:
        await cfg.wait_for(1)
        await cfg.close()  # stopped: the writes below happen while it is away
        for n in range(1, 4):
            await put(http, account, base, "n", {"value": n})
        await cfg.start()
        await cfg.wait_for(4)
        assert cfg.get("n") == 3
        assert cfg.transport == "sse"
    await http.aclose()


async def test_client_reconnects_and_resumes_after_a_server_restart(
    servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)
    http, account, base, key = await _setup(server)
    await put(http, account, base, "n", {"value": 1})
    cfg = AsyncConfigClient(server.url, key, backoff_base_s=0.05, backoff_max_s=0.5)
    await cfg.start()
    await cfg.wait_for(1)
    server.proc.terminate()
    server.proc.wait(15)
    again = start(settings_kwargs, tmp_path, port=server.port)
    servers.append(again)
    http2 = httpx.AsyncClient(base_url=again.url, timeout=10)
    for n in (2, 3):
        await put(http2, account, base, "n", {"value": n})
    await cfg.wait_for(3, timeout_s=15)
    assert cfg.get("n") == 3
    assert cfg.reconnects >= 1
    await cfg.close()
    await http.aclose()
    await http2.aclose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sync_client_follows_changes(
    backend: str, servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    server = start(settings_kwargs, tmp_path)
    servers.append(server)

    async def setup() -> tuple[Account, str, str]:
        http, account, base, key = await _setup(server)
        await put(http, account, base, "mode", {"value": "a"})
        await http.aclose()
        return account, base, key

    account, base, key = asyncio.run(setup())
    with ConfigClient(server.url, key) as cfg:
        cfg.wait_for(1)
        assert cfg.get("mode") == "a"
        httpx.put(
            f"{server.url}{base}/configs/mode", json={"value": "b"}, headers=account.headers
        ).raise_for_status()
        cfg.wait_for(2)
        assert cfg.get("mode") == "b"


def test_a_patch_that_breaks_the_chain_is_refused() -> None:
    from relayport.client.core import Snapshot

    with pytest.raises(ChainError):
        apply_message(
            Snapshot(revision=1, hash="a" * 64),
            {
                "type": "patch",
                "revision": 2,
                "previous": "b" * 64,
                "meta": "",
                "hash": "",
                "patch": [],
            },
        )
    with pytest.raises(ChainError):
        apply_message(
            Snapshot(),
            {
                "type": "snapshot",
                "revision": 5,
                "previous": "",
                "meta": "",
                "hash": "0" * 64,
                "config": {"a": 1},
            },
        )


def test_backoff_is_jittered_and_capped() -> None:
    values = [backoff(10, 0.1, 2.0) for _ in range(200)]
    assert max(values) <= 2.0
    assert min(values) >= 0
    assert len(set(values)) > 100
