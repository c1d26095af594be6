"""Endpoints: CRUD, the SSRF guard at creation (every address form, and names that resolve to
private addresses) and at send time, secrets, roles and bad input."""

from __future__ import annotations

import socket

import httpx
import pytest
from sqlalchemy import update

from relayport.core.netguard import is_forbidden_address, parse_host_ip
from relayport.core.platform import Platform
from relayport.delivery.models import Endpoint
from tests.conftest import Account, api_key, signup
from tests.core.test_auth import assert_problem
from tests.delivery.conftest import Receiver, create_endpoint, eventually, send_message

NO_ALLOW_LIST = {"delivery": {"allow_cidrs": []}}

BLOCKED = [
    "https://127.0.0.1/hook",
    "https://localhost/hook",
    "https://sub.localhost/hook",
    "https://10.0.0.1/hook",
    "https://172.16.5.4/hook",
    "https://192.168.1.10/hook",
    "https://169.254.169.254/latest/meta-data",
    "https://100.64.0.1/hook",
    "https://224.0.0.1/hook",
    "https://240.0.0.1/hook",
    "https://255.255.255.255/hook",
    "https://0.0.0.0/hook",
    "https://[::]/hook",
    "https://[::1]/hook",
    "https://[fc00::1]/hook",
    "https://[fd12:3456::1]/hook",
    "https://[fe80::1]/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://[::ffff:10.0.0.1]/hook",
    "https://[::127.0.0.1]/hook",
    "https://[2002:7f00:1::1]/hook",
    "https://[64:ff9b::a00:1]/hook",
    "https://[64:ff9b:1::1]/hook",
    "https://[2001::1]/hook",
    "https://[ff02::1]/hook",
    "https://2130706433/hook",
    "https://0x7f000001/hook",
    "https://0177.0.0.1/hook",
    "https://127.1/hook",
    "http://93.184.215.14/hook",  # public, but plain http
    "ftp://93.184.215.14/hook",
    "https://user:pw@93.184.215.14/hook",
]


@pytest.mark.parametrize("settings_overrides", [NO_ALLOW_LIST])
async def test_every_forbidden_address_form_is_refused(
    client: httpx.AsyncClient, account: Account
) -> None:
    for url in BLOCKED:
        response = await client.post("/v1/endpoints", json={"url": url}, headers=account.headers)
        assert_problem(response, 422, "endpoint-url-forbidden")
        assert response.json()["pointer"] == "/url", url
    fallback = await client.post(
        "/v1/endpoints",
        json={"url": "https://93.184.215.14/hook", "fallback_urls": ["https://10.1.1.1/"]},
        headers=account.headers,
    )
    assert_problem(fallback, 422, "endpoint-url-forbidden")
    assert fallback.json()["pointer"] == "/fallback_urls/0"
    listed = await client.get("/v1/endpoints", headers=account.headers)
    assert listed.json()["data"] == []
    # A public https URL passes (IP literal: no DNS needed on this machine).
    ok = await client.post(
        "/v1/endpoints", json={"url": "https://93.184.215.14/hook"}, headers=account.headers
    )
    assert ok.status_code == 201, ok.text


def _privately_resolving_name() -> str:
    """A name from this machine's resolver (its host name, /etc/hosts) whose every address is
    non-public: the guard must judge what the name resolves to, not the name."""
    for name in (socket.gethostname(), "runsc", "vm", "ip6-localhost", "ip6-loopback"):
        try:
            infos = socket.getaddrinfo(name, 443)
        except OSError:
            continue
        addresses = {parse_host_ip(info[4][0]) for info in infos}
        if addresses and all(a is not None and is_forbidden_address(a) for a in addresses):
            return name
    pytest.fail("no host name on this machine resolves to a private address")


@pytest.mark.parametrize("settings_overrides", [NO_ALLOW_LIST])
async def test_a_name_resolving_to_a_private_address_is_refused(
    client: httpx.AsyncClient, account: Account
) -> None:
    name = _privately_resolving_name()
    response = await client.post(
        "/v1/endpoints", json={"url": f"https://{name}/hook"}, headers=account.headers
    )
    assert_problem(response, 422, "endpoint-url-forbidden")
    unresolvable = await client.post(
        "/v1/endpoints", json={"url": "https://nxdomain.invalid/hook"}, headers=account.headers
    )
    assert_problem(unresolvable, 422, "endpoint-url-unresolvable")


@pytest.mark.usefixtures("worker")
async def test_the_guard_also_refuses_at_send_time(
    client: httpx.AsyncClient, account: Account, platform: Platform, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(client, account, receiver.url("/ok"))
    # The URL changes behind the API's back (think DNS rebinding): ::1 is outside the
    # 127.0.0.0/8 allow-list, so the connector must refuse to dial it.
    port = receiver.base.rsplit(":", 1)[1]
    async with platform.db.transaction() as session:
        await session.execute(
            update(Endpoint)
            .where(Endpoint.id == endpoint["id"])
            .values(url=f"http://[::1]:{port}/ok")
        )
    await send_message(client, account)

    async def refused() -> bool:
        data = (
            await client.get(f"/v1/endpoints/{endpoint['id']}/attempts", headers=account.headers)
        ).json()["data"]
        return bool(data) and data[-1]["error_class"] == "ssrf"

    await eventually(refused, what="an ssrf-refused attempt")
    assert receiver.received == []


async def test_endpoint_crud_and_secret_access_by_role(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    created = await create_endpoint(
        client,
        account,
        receiver.url("/ok"),
        description="billing",
        filter_types=["invoice.*"],
        fallback_urls=[receiver.url("/fallback")],
        routing="round_robin",
        rate_limit_per_s=50,
    )
    assert created["secret"].startswith("whsec_")
    assert created["enabled"] is True
    assert created["disabled_reason"] is None
    assert created["circuit_state"] == "closed"
    assert (
        "secret"
        not in (await client.get(f"/v1/endpoints/{created['id']}", headers=account.headers)).json()
    )
    secret = await client.get(f"/v1/endpoints/{created['id']}/secret", headers=account.headers)
    assert secret.json()["key"] == created["secret"]
    viewer = await api_key(client, account, "viewer")
    denied = await client.get(
        f"/v1/endpoints/{created['id']}/secret", headers={"Authorization": f"Bearer {viewer}"}
    )
    assert_problem(denied, 403, "insufficient-role")
    listed = await client.get("/v1/endpoints", headers={"Authorization": f"Bearer {viewer}"})
    assert [e["id"] for e in listed.json()["data"]] == [created["id"]]
    patched = await client.patch(
        f"/v1/endpoints/{created['id']}",
        json={"enabled": False, "description": "off"},
        headers=account.headers,
    )
    assert patched.json()["enabled"] is False
    assert patched.json()["disabled_reason"] == "manual"
    assert patched.json()["description"] == "off"
    again = await client.patch(
        f"/v1/endpoints/{created['id']}", json={"enabled": True}, headers=account.headers
    )
    assert again.json()["disabled_reason"] is None
    deleted = await client.delete(f"/v1/endpoints/{created['id']}", headers=account.headers)
    assert deleted.status_code == 204
    gone = await client.get(f"/v1/endpoints/{created['id']}", headers=account.headers)
    assert_problem(gone, 404, "not-found")


async def test_lists_paginate_newest_first(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    ids = [(await create_endpoint(client, account, receiver.url(f"/e{i}")))["id"] for i in range(3)]
    first = (await client.get("/v1/endpoints?limit=2", headers=account.headers)).json()
    assert [e["id"] for e in first["data"]] == [ids[2], ids[1]]
    second = (
        await client.get(f"/v1/endpoints?limit=2&after={first['next']}", headers=account.headers)
    ).json()
    assert [e["id"] for e in second["data"]] == [ids[0]]
    assert second["next"] is None


async def test_lists_show_only_the_callers_tenant(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    other = await signup(client, "Other")
    await create_endpoint(client, other, receiver.url("/ok"))
    await client.post("/v1/event-types", json={"name": "b.t"}, headers=other.headers)
    await send_message(client, other)
    for path in ("/v1/endpoints", "/v1/messages", "/v1/event-types"):
        assert (await client.get(path, headers=account.headers)).json()["data"] == [], path
        assert len((await client.get(path, headers=other.headers)).json()["data"]) == 1, path


@pytest.mark.parametrize(
    "body",
    [
        {"url": 5},
        {"url": "https://93.184.215.14/", "filter_types": ["bad type!"]},
        {"url": "https://93.184.215.14/", "headers": {"webhook-id": "forged"}},
        {"url": "https://93.184.215.14/", "headers": {"X-Ok": "line\nbreak"}},
        {"url": "https://93.184.215.14/", "headers": {"X-Ok": "caf\u00e9"}},
        {"url": "https://93.184.215.14/", "routing": "random"},
        {"url": "https://93.184.215.14/", "rate_limit_per_s": 0},
        {"url": "https://93.184.215.14/", "retry_schedule_s": []},
        {"url": "https://93.184.215.14/", "channels": ["a b"]},
        {"url": "https://93.184.215.14/", "colour": "red"},
        {"url": "x" * 3000},
    ],
)
async def test_bad_endpoint_bodies_are_422(
    client: httpx.AsyncClient, account: Account, body: dict[str, object]
) -> None:
    response = await client.post("/v1/endpoints", json=body, headers=account.headers)
    assert_problem(response, 422, "validation-error")


async def test_bad_secrets_and_inputs_are_problems(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    for secret in ("nope", "whsec_!!!", "whsec_" + "QUJD" * 2):
        response = await client.post(
            "/v1/endpoints",
            json={"url": receiver.url("/ok"), "secret": secret},
            headers=account.headers,
        )
        assert_problem(response, 422, "validation-error")
        assert response.json()["errors"][0]["code"] == "bad_secret"
    bad_json = await client.post(
        "/v1/messages",
        content=b"{",
        headers={**account.headers, "content-type": "application/json"},
    )
    assert_problem(bad_json, 400, "malformed-json")
    for body in (
        {"event_type": "bad type", "payload": {}},
        {"event_type": "a.b", "payload": [1, 2]},
        {"event_type": "a.b"},
    ):
        response = await client.post("/v1/messages", json=body, headers=account.headers)
        assert_problem(response, 422, "validation-error")
    since = await client.post("/v1/endpoints/ep_x/recover?since=yesterday", headers=account.headers)
    assert_problem(since, 422, "validation-error")
    dup = await client.post("/v1/event-types", json={"name": "a.b"}, headers=account.headers)
    assert dup.status_code == 201
    again = await client.post("/v1/event-types", json={"name": "a.b"}, headers=account.headers)
    assert_problem(again, 409, "event-type-exists")
