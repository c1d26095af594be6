"""Sources: tenant-scoped CRUD, secrets encrypted at rest and shown once, rotation, roles."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from relayport.core.crypto import DecryptionError
from relayport.core.crypto_rotation import ENCRYPTED_COLUMNS
from relayport.core.platform import Platform
from relayport.ingest import signatures
from relayport.ingest.models import Source
from relayport.ingest.schemas import Scheme
from tests.conftest import Account, api_key, signup
from tests.core.test_auth import assert_problem
from tests.ingest.conftest import create_source, deliver


def test_api_schemes_are_the_verifiers_schemes() -> None:
    assert set(Scheme.__args__) == set(signatures.SCHEMES)


@pytest.mark.parametrize("scheme", signatures.SCHEMES)
async def test_created_source_shows_its_generated_secret_once(
    client: httpx.AsyncClient, account: Account, scheme: str
) -> None:
    extra = {"hmac": {"header": "X-Signature"}} if scheme == "hmac" else {}
    created = await create_source(client, account, name="p", scheme=scheme, **extra)
    assert created["id"].startswith("src_")
    assert created["ingest_url"] == f"/v1/ingest/{created['id']}"
    assert created["tolerance_s"] == 300
    assert created["body_limit_bytes"] == 1_048_576
    assert created["handler"] == "noop"
    assert created["max_attempts"] == 8
    [secret] = created["secrets"]
    signatures.validate_secret(scheme, secret["value"])
    if scheme == "standard":
        assert secret["value"].startswith("whsec_")
    again = await client.get(f"/v1/sources/{created['id']}", headers=account.headers)
    assert again.status_code == 200
    assert secret["value"] not in again.text
    assert again.json()["secrets"] == [{"created_at": secret["created_at"], "expires_at": None}]
    listed = await client.get("/v1/sources", headers=account.headers)
    assert [s["id"] for s in listed.json()["data"]] == [created["id"]]
    assert secret["value"] not in listed.text


async def test_secrets_are_encrypted_at_rest_bound_to_their_source(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    secret = "It's a Secret to Everybody"
    a = await create_source(client, account, secrets=[secret])
    b = await create_source(client, account, secrets=["another secret"])
    assert "ingest_sources.secrets_token" in {c.name for c in ENCRYPTED_COLUMNS}
    async with platform.db.sessions() as session:
        rows = {s.id: s for s in (await session.scalars(select(Source))).all()}
    token_a = rows[a["id"]].secrets_token
    assert secret not in token_a
    opened = platform.keyring.decrypt(token_a, f"{account.tenant_id}:{a['id']}:secrets".encode())
    assert secret in opened.decode()
    # A token copied onto another source does not open there.
    with pytest.raises(DecryptionError):
        platform.keyring.decrypt(token_a, f"{account.tenant_id}:{b['id']}:secrets".encode())


async def test_given_secrets_must_suit_the_scheme(
    client: httpx.AsyncClient, account: Account
) -> None:
    response = await client.post(
        "/v1/sources",
        json={"name": "svix", "scheme": "standard", "secrets": ["not-a-whsec-secret!"]},
        headers=account.headers,
    )
    assert_problem(response, 422, "validation-error")
    assert response.json()["errors"][0]["pointer"] == "/secrets/0"
    four = await client.post(
        "/v1/sources",
        json={"name": "x", "scheme": "github", "secrets": ["a", "b", "c", "d"]},
        headers=account.headers,
    )
    assert_problem(four, 422)


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"scheme": "hmac"}, "/"),
        ({"scheme": "github", "hmac": {"header": "x-sig"}}, "/"),
        ({"scheme": "github", "handler": "no-such-handler"}, "/handler"),
        ({"scheme": "github", "body_limit_bytes": 10 * 1_048_576 + 1}, "/body_limit_bytes"),
        ({"scheme": "hmac", "hmac": {"header": "bad header"}}, "/hmac/header"),
        ({"scheme": "hmac", "hmac": {"header": "x-s"}, "type_pointer": "a/b"}, "/type_pointer"),
        ({"scheme": "nope"}, "/scheme"),
    ],
)
async def test_invalid_source_settings_are_422(
    client: httpx.AsyncClient, account: Account, body: dict[str, object], pointer: str
) -> None:
    response = await client.post("/v1/sources", json={"name": "x", **body}, headers=account.headers)
    assert_problem(response, 422, "validation-error")
    pointers = [e["pointer"] for e in response.json()["errors"]]
    assert any(p.startswith(pointer) for p in pointers), pointers


async def test_viewers_read_and_operators_write(
    client: httpx.AsyncClient, account: Account
) -> None:
    viewer = {"Authorization": f"Bearer {await api_key(client, account, 'viewer')}"}
    operator = {"Authorization": f"Bearer {await api_key(client, account, 'operator')}"}
    denied = await client.post(
        "/v1/sources", json={"name": "x", "scheme": "github"}, headers=viewer
    )
    assert_problem(denied, 403, "insufficient-role")
    made = await client.post(
        "/v1/sources", json={"name": "x", "scheme": "github"}, headers=operator
    )
    assert made.status_code == 201
    source_id = made.json()["id"]
    assert (await client.get(f"/v1/sources/{source_id}", headers=viewer)).status_code == 200
    for method, path, body in [
        ("PATCH", f"/v1/sources/{source_id}", {"name": "y"}),
        ("POST", f"/v1/sources/{source_id}/secrets/rotate", {}),
        ("DELETE", f"/v1/sources/{source_id}", None),
        ("GET", f"/v1/sources/{source_id}/rejections", None),
        ("POST", f"/v1/sources/{source_id}/replay", None),
    ]:
        refused = await client.request(method, path, json=body, headers=viewer)
        assert_problem(refused, 403, "insufficient-role")


async def test_rotation_keeps_the_old_secret_for_the_grace_period(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account, secrets=["first secret"])
    rotated = await client.post(
        f"/v1/sources/{source['id']}/secrets/rotate",
        json={"grace_period_s": 3600},
        headers=account.headers,
    )
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret != "first secret"
    infos = rotated.json()["secrets"]
    assert [i["expires_at"] is None for i in infos] == [True, False]
    # Both verify during the grace period.
    for secret in ("first secret", new_secret):
        response = await deliver(client, source, b'{"n": "%s"}' % secret.encode(), secret=secret)
        assert response.status_code == 202, response.text
    # A third, given secret; then a fourth is one too many while the others are in grace.
    third = await client.post(
        f"/v1/sources/{source['id']}/secrets/rotate",
        json={"secret": "third secret"},
        headers=account.headers,
    )
    assert third.json()["secret"] == "third secret"
    assert len(third.json()["secrets"]) == 3
    fourth = await client.post(
        f"/v1/sources/{source['id']}/secrets/rotate", json={}, headers=account.headers
    )
    assert_problem(fourth, 409, "too-many-secrets")
    # With no grace period, the old secrets stop at once.
    last = await client.post(
        f"/v1/sources/{source['id']}/secrets/rotate",
        json={"secret": "only secret", "grace_period_s": 0},
        headers=account.headers,
    )
    assert [i["expires_at"] for i in last.json()["secrets"]] == [None]
    old = await deliver(client, source, b'{"n": 1}', secret="first secret")
    assert_problem(old, 401, "invalid-signature")
    new = await deliver(client, source, b'{"n": 1}', secret="only secret")
    assert new.status_code == 202
    actions = await client.get(
        "/v1/audit-events", params={"action": "source.secret_rotated"}, headers=account.headers
    )
    assert len(actions.json()["data"]) == 3


async def test_patch_applies_to_the_next_delivery(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account)
    assert (await deliver(client, source, b'{"a": 1}')).status_code == 202
    patched = await client.patch(
        f"/v1/sources/{source['id']}",
        json={"enabled": False, "name": "renamed", "max_attempts": 3},
        headers=account.headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "renamed"
    assert patched.json()["max_attempts"] == 3
    assert_problem(await deliver(client, source, b'{"a": 2}'), 403, "source-disabled")
    scheme = await client.patch(
        f"/v1/sources/{source['id']}", json={"scheme": "stripe"}, headers=account.headers
    )
    assert_problem(scheme, 422)
    unknown = await client.patch(
        f"/v1/sources/{source['id']}", json={"handler": "nope"}, headers=account.headers
    )
    assert_problem(unknown, 422)


async def test_delete_removes_the_source_with_its_events_and_is_audited(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account)
    accepted = await deliver(client, source, b'{"a": 1}')
    event_id = accepted.json()["event_id"]
    await deliver(client, source, b'{"a": 2}', secret="wrong")
    gone = await client.delete(f"/v1/sources/{source['id']}", headers=account.headers)
    assert gone.status_code == 204
    assert (
        await client.get(f"/v1/sources/{source['id']}", headers=account.headers)
    ).status_code == 404
    assert (await client.get(f"/v1/events/{event_id}", headers=account.headers)).status_code == 404
    assert_problem(await deliver(client, source, b'{"a": 3}'), 404, "not-found")
    audit = await client.get("/v1/audit-events", headers=account.headers)
    actions = [e["action"] for e in audit.json()["data"]]
    assert "source.created" in actions
    assert "source.deleted" in actions


async def test_sources_are_tenant_scoped(client: httpx.AsyncClient, account: Account) -> None:
    other = await signup(client, "Other")
    theirs = await create_source(client, other)
    mine = await client.get("/v1/sources", headers=account.headers)
    assert mine.json()["data"] == []
    for path in (f"/v1/sources/{theirs['id']}", f"/v1/sources/{theirs['id']}/rejections"):
        assert_problem(await client.get(path, headers=account.headers), 404)
