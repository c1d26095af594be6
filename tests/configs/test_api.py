"""The write API: versions, ETags, schemas, rollback, promote, diff, verify; on both backends."""

from __future__ import annotations

import httpx

from tests.configs.helpers import env_path, environment, project, put
from tests.conftest import Account, api_key

SCHEMA = {
    "type": "object",
    "properties": {"limit": {"type": "integer", "minimum": 1}, "mode": {"enum": ["a", "b"]}},
    "required": ["limit"],
}


async def test_put_answers_revision_and_etag_and_if_match_guards(
    client: httpx.AsyncClient, account: Account
) -> None:
    pid = await project(client, account)
    base = env_path(pid, await environment(client, account, pid, "prod"))
    first = await put(client, account, base, "limits", {"value": {"limit": 5}, "schema": SCHEMA})
    assert first.status_code == 200, first.text
    assert first.json()["revision"] == 1
    etag = first.headers["etag"]
    second = await put(
        client, account, base, "limits", {"value": {"limit": 6}}, **{"If-Match": etag}
    )
    assert second.json()["revision"] == 2
    stale = await put(
        client, account, base, "limits", {"value": {"limit": 7}}, **{"If-Match": etag}
    )
    assert stale.status_code == 412
    assert stale.json()["type"] == "/problems/precondition-failed"
    got = await client.get(f"{base}/configs/limits", headers=account.headers)
    assert got.json()["value"] == {"limit": 6}
    assert got.headers["etag"] == second.headers["etag"]


async def test_schema_violations_are_listed_with_pointers_and_nothing_is_committed(
    client: httpx.AsyncClient, account: Account
) -> None:
    pid = await project(client, account)
    base = env_path(pid, await environment(client, account, pid, "prod"))
    bad = await put(
        client, account, base, "limits", {"value": {"limit": 0, "mode": "z"}, "schema": SCHEMA}
    )
    assert bad.status_code == 422
    body = bad.json()
    assert body["type"] == "/problems/validation-error"
    assert sorted(e["pointer"] for e in body["errors"]) == ["/limit", "/mode"]
    invalid_schema = await put(
        client, account, base, "x", {"value": 1, "schema": {"type": "no-such-type"}}
    )
    assert invalid_schema.status_code == 422
    env = await client.get(base, headers=account.headers)
    assert env.json()["revision"] == 0


async def test_patch_rollback_promote_diff_verify(
    client: httpx.AsyncClient, account: Account
) -> None:
    pid = await project(client, account)
    prod = await environment(client, account, pid, "prod")
    staging = await environment(client, account, pid, "staging")
    base = env_path(pid, staging)
    await put(client, account, base, "limits", {"value": {"limit": 5}, "schema": SCHEMA})
    patched = await client.patch(
        f"{base}/configs/limits",
        content=b'[{"op": "replace", "path": "/limit", "value": 9}]',
        headers={**account.headers, "content-type": "application/json-patch+json"},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["revision"] == 2
    refused = await client.patch(
        f"{base}/configs/limits",
        json=[{"op": "remove", "path": "/limit"}],
        headers=account.headers,
    )
    assert refused.status_code == 422  # the schema requires `limit`
    broken = await client.patch(
        f"{base}/configs/limits",
        json=[{"op": "test", "path": "/limit", "value": 1}],
        headers=account.headers,
    )
    assert broken.status_code == 422
    assert broken.json()["type"] == "/problems/patch-failed"
    diff = await client.get(f"{base}/diff", params={"from": 1, "to": 2}, headers=account.headers)
    assert diff.json()["patch"] == [{"op": "replace", "path": "/limits/limit", "value": 9}]
    back = await client.post(f"{base}/rollback", json={"to_revision": 1}, headers=account.headers)
    assert back.json()["revision"] == 3
    now = await client.get(f"{base}/configs/limits", headers=account.headers)
    assert now.json()["value"] == {"limit": 5}
    promoted = await client.post(
        f"{base}/promote", json={"to": "prod", "keys": ["limits"]}, headers=account.headers
    )
    assert promoted.status_code == 200, promoted.text
    prod_cfg = await client.get(f"{env_path(pid, prod)}/configs", headers=account.headers)
    assert prod_cfg.json()["configs"] == {"limits": {"limit": 5}}
    assert prod_cfg.json()["schemas"] == {"limits": SCHEMA}
    versions = await client.get(f"{base}/versions", params={"limit": 2}, headers=account.headers)
    page = versions.json()
    assert [v["revision"] for v in page["data"]] == [3, 2]
    older = await client.get(
        f"{base}/versions", params={"after": page["next"]}, headers=account.headers
    )
    assert [v["revision"] for v in older.json()["data"]] == [1]
    assert page["data"][0]["previous_hash"] == page["data"][1]["hash"]
    verify = await client.get(f"{base}/verify", headers=account.headers)
    assert verify.json()["ok"] is True, verify.json()
    events = await client.get("/v1/audit-events", headers=account.headers)
    actions = {e["action"] for e in events.json()["data"]}
    assert {"config.put", "config.patch", "config.rollback", "config.promote"} <= actions


async def test_branch_copies_the_head_and_viewers_cannot_write(
    client: httpx.AsyncClient, account: Account
) -> None:
    pid = await project(client, account)
    prod = await environment(client, account, pid, "prod")
    await put(client, account, env_path(pid, prod), "a", {"value": [1, 2]})
    branch = await environment(client, account, pid, "preview", **{"from": "prod"})
    cfg = await client.get(f"{env_path(pid, branch)}/configs", headers=account.headers)
    assert cfg.json()["configs"] == {"a": [1, 2]}
    assert cfg.json()["revision"] == 1
    viewer = await api_key(client, account, "viewer")
    r = await client.put(
        f"{env_path(pid, prod)}/configs/a",
        json={"value": 1},
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert r.status_code == 403
