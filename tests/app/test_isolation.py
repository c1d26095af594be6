"""Tenant isolation: every route that takes an id, called with another tenant's ids, is a 404.

The walk covers every route of the app, so a new route with an id parameter fails here until
this module knows how to make that kind of resource for tenant B.
"""

from __future__ import annotations

import re

import httpx
from fastapi import FastAPI

from tests.configs.helpers import tenant_resources
from tests.conftest import Account, signup
from tests.ingest.conftest import create_source, deliver

PARAM = re.compile(r"{(\w+)}")
# Public routes whose id is itself the credential's scope: the provider's signature, not the
# caller's tenant, decides (tests/ingest covers them).
PUBLIC = {"/v1/ingest/{source_id}"}


async def _tenant_b_resources(client: httpx.AsyncClient, b: Account) -> dict[str, str]:
    key = await client.post("/v1/api-keys", json={"name": "b"}, headers=b.headers)
    source = await create_source(client, b)
    event = await deliver(client, source, b'{"zen": "b"}')
    jobs = await client.get("/v1/jobs", headers=b.headers)
    # Disabled, so nothing is sent to this (public, unreachable) address during the walk.
    endpoint = await client.post(
        "/v1/endpoints",
        json={"url": "https://93.184.215.14/hook", "enabled": False},
        headers=b.headers,
    )
    assert endpoint.status_code == 201, endpoint.text
    event_type = await client.post("/v1/event-types", json={"name": "b.only"}, headers=b.headers)
    assert event_type.status_code == 201, event_type.text
    message = await client.post(
        "/v1/messages", json={"event_type": "b.only", "payload": {}}, headers=b.headers
    )
    assert message.status_code == 202, message.text
    return {
        "endpoint_id": endpoint.json()["id"],
        "event_type": "b.only",
        "message_id": message.json()["id"],
        "user_id": b.user_id,
        "key_id": key.json()["id"],
        "source_id": source["id"],
        "event_id": event.json()["event_id"],
        "job_id": jobs.json()["data"][0]["id"],
        **await tenant_resources(client, b),
    }


async def test_no_route_reveals_another_tenants_resources(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    a = await signup(client, "Tenant A")
    b = await signup(client, "Tenant B")
    ids = await _tenant_b_resources(client, b)
    walked = 0
    # The OpenAPI document lists every public route with its methods.
    for template, operations in app.openapi()["paths"].items():
        params = PARAM.findall(template)
        if not params or template in PUBLIC:
            continue
        missing = [p for p in params if p not in ids]
        assert not missing, f"{template}: teach this test to make a {missing} for tenant B"
        path = template
        for name in params:
            path = path.replace("{" + name + "}", ids[name])
        for method in (m.upper() for m in operations):
            body = {} if method in {"POST", "PUT", "PATCH"} else None
            response = await client.request(method, path, json=body, headers=a.headers)
            walked += 1
            # 404 for the id; 422 only when the body is refused before the lookup, which
            # still says nothing about tenant B's resource.
            assert response.status_code in (404, 422), (method, path, response.text)
            assert ids[params[0]] not in response.text
            if response.status_code == 422:
                # Retry with a valid body so the lookup itself is exercised.
                valid = {"role": "viewer"} if "users" in path else {}
                again = await client.request(method, path, json=valid, headers=a.headers)
                assert again.status_code == 404, (method, path, again.text)
    assert walked >= 12
    # And tenant B's data is untouched and still visible to B.
    key = await client.get(f"/v1/api-keys/{ids['key_id']}", headers=b.headers)
    assert key.status_code == 200
    assert key.json()["revoked_at"] is None
    user = await client.get(f"/v1/users/{b.user_id}", headers=b.headers)
    assert user.json()["role"] == "admin"


async def test_lists_show_only_the_callers_tenant(client: httpx.AsyncClient) -> None:
    a = await signup(client)
    b = await signup(client)
    await client.post("/v1/api-keys", json={"name": "b-only"}, headers=b.headers)
    keys = await client.get("/v1/api-keys", headers=a.headers)
    assert keys.json()["data"] == []
    users = await client.get("/v1/users", headers=a.headers)
    assert [u["id"] for u in users.json()["data"]] == [a.user_id]
    events = await client.get("/v1/audit-events", headers=a.headers)
    assert {e["actor_id"] for e in events.json()["data"]} == {a.user_id}
    source = await create_source(client, b)
    assert (await deliver(client, source, b'{"b": 1}')).status_code == 202
    for path in ("/v1/sources", "/v1/events", "/v1/jobs"):
        assert (await client.get(path, headers=a.headers)).json()["data"] == [], path
        assert len((await client.get(path, headers=b.headers)).json()["data"]) == 1, path
