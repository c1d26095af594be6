"""Identity through HTTP: signup, login, refresh rotation, logout, JWT defects, API keys, roles."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json

import httpx
import jwt
import pytest
from fastapi import FastAPI

from relayport.core.auth.models import User
from relayport.core.auth.passwords import hash_password
from relayport.core.db import utcnow
from relayport.core.ids import new_id
from tests.conftest import Account, api_key, signup

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("/problems/")
    if slug:
        assert body["type"] == f"/problems/{slug}", body


async def test_signup_makes_first_user_admin_of_a_new_tenant(client: httpx.AsyncClient) -> None:
    account = await signup(client, "Acme Inc")
    assert account.body["token_type"] == "Bearer"
    assert account.body["expires_in"] == 900
    assert account.body["user"]["role"] == "admin"
    assert account.body["tenant"]["name"] == "Acme Inc"
    me = await client.get("/v1/me", headers=account.headers)
    assert me.status_code == 200
    assert me.json()["tenant"]["id"] == account.tenant_id
    assert me.json()["kind"] == "user"


async def test_signup_twice_with_one_email_conflicts(
    client: httpx.AsyncClient, account: Account
) -> None:
    again = await client.post(
        "/v1/auth/signup", json={"email": account.email.upper(), "password": "another password1"}
    )
    assert_problem(again, 409, "email-taken")


async def test_login_success_and_failure_are_audited(
    client: httpx.AsyncClient, account: Account
) -> None:
    bad = await client.post(
        "/v1/auth/login", json={"email": account.email, "password": "wrong password!"}
    )
    assert_problem(bad, 401, "invalid-credentials")
    unknown = await client.post(
        "/v1/auth/login", json={"email": "nobody@example.com", "password": "wrong password!"}
    )
    assert_problem(unknown, 401, "invalid-credentials")
    assert bad.json()["detail"] == unknown.json()["detail"]  # no account enumeration
    good = await client.post(
        "/v1/auth/login",
        json={"email": account.email, "password": account.password},
        headers={"X-Request-ID": "login-req-1"},
    )
    assert good.status_code == 200
    assert set(good.json()) >= {"access_token", "refresh_token", "token_type", "expires_in"}
    events = await client.get("/v1/audit-events", headers=account.headers)
    actions = [e["action"] for e in events.json()["data"]]
    assert actions[:2] == ["auth.login.succeeded", "auth.login.failed"]
    success = events.json()["data"][0]
    assert success["request_id"] == "login-req-1"
    assert success["ip"] == "203.0.113.7"
    assert success["actor_id"] == account.user_id


async def test_refresh_rotates_and_reuse_revokes_the_family(
    client: httpx.AsyncClient, account: Account
) -> None:
    first = await client.post("/v1/auth/refresh", json={"refresh_token": account.refresh_token})
    assert first.status_code == 200
    rotated = first.json()["refresh_token"]
    assert rotated != account.refresh_token
    reuse = await client.post("/v1/auth/refresh", json={"refresh_token": account.refresh_token})
    assert_problem(reuse, 401, "refresh-token-reused")
    # The thief's copy and the legitimate successor are both dead now.
    after = await client.post("/v1/auth/refresh", json={"refresh_token": rotated})
    assert_problem(after, 401, "refresh-token-reused")


async def test_logout_revokes_the_session(client: httpx.AsyncClient, account: Account) -> None:
    out = await client.post("/v1/auth/logout", json={"refresh_token": account.refresh_token})
    assert out.status_code == 204
    again = await client.post("/v1/auth/refresh", json={"refresh_token": account.refresh_token})
    assert again.status_code == 401


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("defect", ["alg-none", "unknown-kid", "tampered", "expired", "garbage"])
async def test_defective_access_tokens_are_401(
    client: httpx.AsyncClient, account: Account, defect: str
) -> None:
    header, payload, signature = account.access_token.split(".")
    claims = jwt.decode(account.access_token, options={"verify_signature": False})
    if defect == "alg-none":
        token = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{payload}."
    elif defect == "unknown-kid":
        token = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'other'})}.{payload}.{signature}"
    elif defect == "tampered":
        token = f"{header}.{_b64({**claims, 'role': 'admin', 'tid': 'ten_other'})}.{signature}"
    elif defect == "expired":
        past = int((dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).timestamp())
        token = jwt.encode({**claims, "exp": past}, "not-the-key" * 4, headers={"kid": "k1"})
    else:
        token = "not.a.jwt"
    response = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert_problem(response, 401)
    assert "WWW-Authenticate" in response.headers


async def test_missing_credentials_are_401(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/me"), 401, "unauthorized")
    basic = await client.get("/v1/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert_problem(basic, 401)


async def test_api_key_lifecycle(client: httpx.AsyncClient, account: Account) -> None:
    created = await client.post(
        "/v1/api-keys", json={"name": "ci", "role": "operator"}, headers=account.headers
    )
    assert created.status_code == 201
    body = created.json()
    secret = body["key"]
    assert secret.startswith("rp_")
    assert body["prefix"] == secret[:11]
    key_headers = {"Authorization": f"Bearer {secret}"}
    me = await client.get("/v1/me", headers=key_headers)
    assert me.json() | {"tenant": None} == {
        "kind": "api_key",
        "id": body["id"],
        "role": "operator",
        "tenant": None,
    }
    listed = await client.get("/v1/api-keys", headers=account.headers)
    assert [k["id"] for k in listed.json()["data"]] == [body["id"]]
    assert "key" not in listed.json()["data"][0]
    revoked = await client.delete(f"/v1/api-keys/{body['id']}", headers=account.headers)
    assert revoked.status_code == 204
    assert_problem(await client.get("/v1/me", headers=key_headers), 401, "invalid-api-key")
    actions = [
        e["action"]
        for e in (await client.get("/v1/audit-events", headers=account.headers)).json()["data"]
    ]
    assert "api_key.created" in actions
    assert "api_key.revoked" in actions


async def test_expired_api_key_is_refused(client: httpx.AsyncClient, account: Account) -> None:
    created = await client.post(
        "/v1/api-keys", json={"name": "short", "expires_in_s": 1}, headers=account.headers
    )
    assert created.status_code == 201
    expires = dt.datetime.fromisoformat(created.json()["expires_at"])
    assert dt.timedelta(0) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=1)


async def test_roles_are_enforced(client: httpx.AsyncClient, account: Account) -> None:
    viewer = {"Authorization": f"Bearer {await api_key(client, account, 'viewer')}"}
    operator = {"Authorization": f"Bearer {await api_key(client, account, 'operator')}"}
    assert (await client.get("/v1/me", headers=viewer)).status_code == 200
    assert_problem(await client.get("/v1/api-keys", headers=viewer), 403, "insufficient-role")
    assert_problem(await client.get("/v1/audit-events", headers=operator), 403)
    escalate = await client.post(
        "/v1/api-keys", json={"name": "x", "role": "admin"}, headers=operator
    )
    assert_problem(escalate, 403)


async def test_role_change_is_audited_and_takes_effect(
    client: httpx.AsyncClient, account: Account
) -> None:
    # Demoting the only admin would lock the tenant out.
    last = await client.patch(
        f"/v1/users/{account.user_id}", json={"role": "viewer"}, headers=account.headers
    )
    assert_problem(last, 409, "last-admin")
    admin_key = {"Authorization": f"Bearer {await api_key(client, account, 'admin')}"}
    # Keys are not users: the tenant still has one admin user, so still refused.
    assert (
        await client.patch(
            f"/v1/users/{account.user_id}", json={"role": "viewer"}, headers=admin_key
        )
    ).status_code == 409
    users = await client.get("/v1/users", headers=account.headers)
    assert [u["id"] for u in users.json()["data"]] == [account.user_id]
    events = await client.get(
        "/v1/audit-events", params={"action": "auth.signup"}, headers=admin_key
    )
    assert [e["action"] for e in events.json()["data"]] == ["auth.signup"]


async def test_second_user_role_change_is_audited_and_applies_to_their_token(
    app: FastAPI, client: httpx.AsyncClient, account: Account
) -> None:
    platform = app.state.platform
    email = "second@example.com"
    async with platform.db.transaction() as session:
        session.add(
            User(
                id=new_id("usr"),
                tenant_id=account.tenant_id,
                email=email,
                password_hash=await hash_password("second password!"),
                role="viewer",
                is_active=True,
                created_at=utcnow(),
            )
        )
    login = await client.post(
        "/v1/auth/login", json={"email": email, "password": "second password!"}
    )
    second = {"Authorization": f"Bearer {login.json()['access_token']}"}
    me = (await client.get("/v1/me", headers=second)).json()
    assert me["role"] == "viewer"
    assert_problem(await client.get("/v1/api-keys", headers=second), 403)
    promoted = await client.patch(
        f"/v1/users/{me['id']}", json={"role": "admin"}, headers=account.headers
    )
    assert promoted.json()["role"] == "admin"
    # The same access token now carries the new role: roles are read per request.
    assert (await client.get("/v1/api-keys", headers=second)).status_code == 200
    events = await client.get(
        "/v1/audit-events", params={"action": "user.role_changed"}, headers=account.headers
    )
    [event] = events.json()["data"]
    assert event["target_id"] == me["id"]
    assert event["details"] == {"from": "viewer", "to": "admin"}
    # Deactivating them kills their session at once.
    off = await client.patch(
        f"/v1/users/{me['id']}", json={"is_active": False}, headers=account.headers
    )
    assert off.status_code == 200
    assert_problem(await client.get("/v1/me", headers=second), 401)


async def test_pagination_walks_every_key_once(client: httpx.AsyncClient, account: Account) -> None:
    ids = []
    for i in range(5):
        r = await client.post("/v1/api-keys", json={"name": f"k{i}"}, headers=account.headers)
        ids.append(r.json()["id"])
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if after:
            params["after"] = after
        page = (await client.get("/v1/api-keys", params=params, headers=account.headers)).json()
        seen += [k["id"] for k in page["data"]]
        after = page["next"]
        if after is None:
            break
    assert seen == list(reversed(ids))


async def _second_admin(app: FastAPI, account: Account, email: str) -> dict[str, str]:
    async with app.state.platform.db.transaction() as session:
        session.add(
            User(
                id=new_id("usr"),
                tenant_id=account.tenant_id,
                email=email,
                password_hash=await hash_password("second password!"),
                role="admin",
                is_active=True,
                created_at=utcnow(),
            )
        )
    transport = httpx.ASGITransport(app=app, client=("203.0.113.8", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
        login = await other.post(
            "/v1/auth/login", json={"email": email, "password": "second password!"}
        )
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def test_concurrent_demotions_keep_one_admin(
    app: FastAPI, client: httpx.AsyncClient, account: Account
) -> None:
    second = await _second_admin(app, account, "two@example.com")
    second_id = (await client.get("/v1/me", headers=second)).json()["id"]
    results = await asyncio.gather(
        client.patch(f"/v1/users/{second_id}", json={"role": "viewer"}, headers=account.headers),
        client.patch(f"/v1/users/{account.user_id}", json={"role": "viewer"}, headers=second),
    )
    assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
    first = await client.get("/v1/users", headers=account.headers)
    # Whichever of the two is still admin can list; the other is now a viewer.
    listing = first if first.status_code == 200 else await client.get("/v1/users", headers=second)
    assert [u["role"] for u in listing.json()["data"]].count("admin") == 1


async def test_deactivated_users_keys_stop_working_and_demotion_lowers_them(
    app: FastAPI, client: httpx.AsyncClient, account: Account
) -> None:
    second = await _second_admin(app, account, "leaver@example.com")
    second_id = (await client.get("/v1/me", headers=second)).json()["id"]
    made = await client.post(
        "/v1/api-keys", json={"name": "theirs", "role": "admin"}, headers=second
    )
    their_key = {"Authorization": f"Bearer {made.json()['key']}"}
    assert (await client.get("/v1/users", headers=their_key)).status_code == 200
    demoted = await client.patch(
        f"/v1/users/{second_id}", json={"role": "operator"}, headers=account.headers
    )
    assert demoted.status_code == 200
    assert_problem(await client.get("/v1/users", headers=their_key), 403, "insufficient-role")
    off = await client.patch(
        f"/v1/users/{second_id}", json={"is_active": False}, headers=account.headers
    )
    assert off.status_code == 200
    assert_problem(await client.get("/v1/ping", headers=their_key), 401, "invalid-api-key")
    key = await client.get(f"/v1/api-keys/{made.json()['id']}", headers=account.headers)
    assert key.json()["revoked_at"] is not None


async def test_failed_logins_from_one_ip_do_not_lock_the_owner_out(
    app: FastAPI, client: httpx.AsyncClient, account: Account
) -> None:
    for _ in range(10):
        await client.post("/v1/auth/login", json={"email": account.email, "password": "guess!"})
    throttled = await client.post(
        "/v1/auth/login", json={"email": account.email, "password": account.password}
    )
    assert_problem(throttled, 429, "login-throttled")
    transport = httpx.ASGITransport(app=app, client=("192.0.2.77", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as owner:
        ok = await owner.post(
            "/v1/auth/login", json={"email": account.email, "password": account.password}
        )
    assert ok.status_code == 200


async def test_concurrent_refreshes_of_one_token_issue_one_successor(
    client: httpx.AsyncClient, account: Account
) -> None:
    """Exactly one of two simultaneous refreshes wins. (When they truly overlap the loser is
    refused without revoking; one that arrives after the winner committed is a replay and
    revokes the family: the two cannot be told apart.)"""
    body = {"refresh_token": account.refresh_token}
    results = await asyncio.gather(
        client.post("/v1/auth/refresh", json=body), client.post("/v1/auth/refresh", json=body)
    )
    assert sorted(r.status_code for r in results) == [200, 401]
