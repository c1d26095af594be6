"""Helpers shared by the configs tests (and the platform's isolation walk)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Account


async def project(client: httpx.AsyncClient, account: Account, name: str = "shop") -> str:
    r = await client.post("/v1/projects", json={"name": name}, headers=account.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def environment(
    client: httpx.AsyncClient, account: Account, project_id: str, name: str, **extra: Any
) -> str:
    r = await client.post(
        f"/v1/projects/{project_id}/environments",
        json={"name": name, **extra},
        headers=account.headers,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def env_path(project_id: str, env_id: str) -> str:
    return f"/v1/projects/{project_id}/environments/{env_id}"


async def put(
    client: httpx.AsyncClient,
    account: Account,
    base: str,
    key: str,
    body: dict[str, Any],
    **headers: str,
) -> httpx.Response:
    return await client.put(
        f"{base}/configs/{key}", json=body, headers={**account.headers, **headers}
    )


async def client_key(
    client: httpx.AsyncClient, account: Account, base: str, *, secrets: bool = False
) -> str:
    r = await client.post(
        f"{base}/client-keys", json={"name": "app", "secrets": secrets}, headers=account.headers
    )
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


async def tenant_resources(client: httpx.AsyncClient, account: Account) -> dict[str, str]:
    """Ids of one project, environment, key, version and client key of `account`'s tenant."""
    pid = await project(client, account, "isolation")
    eid = await environment(client, account, pid, "prod")
    base = env_path(pid, eid)
    r = await put(client, account, base, "feature", {"value": {"on": True}})
    assert r.status_code == 200, r.text
    keys = await client.post(f"{base}/client-keys", json={"name": "b"}, headers=account.headers)
    return {
        "project_id": pid,
        "environment_id": eid,
        "key": "feature",
        "revision": "1",
        "client_key_id": keys.json()["id"],
    }
