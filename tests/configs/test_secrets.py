"""Secrets: encrypted at rest, revealed only to operators and secret-reading client keys,
every reveal audited, never in a viewer's answer, the logs or the database in clear."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from relayport.core.crypto import KeyRing
from relayport.core.crypto_rotation import rewrap_all
from tests.configs.helpers import client_key, env_path, environment, project, put
from tests.conftest import Account, api_key

SECRET = "hunter2-Zq9x-very-secret"
SCHEMA = {
    "type": "object",
    "properties": {"host": {"type": "string"}, "password": {"type": "string", "x-secret": True}},
}


async def _db_setup(client: httpx.AsyncClient, account: Account) -> str:
    pid = await project(client, account)
    base = env_path(pid, await environment(client, account, pid, "prod"))
    r = await put(
        client,
        account,
        base,
        "db",
        {"value": {"host": "db1", "password": SECRET}, "schema": SCHEMA},
    )
    assert r.status_code == 200, r.text
    return base


async def test_secrets_are_encrypted_at_rest_and_revealed_only_to_allowed_readers(
    app: FastAPI, client: httpx.AsyncClient, account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = await _db_setup(client, account)
    # Operators (the account is an admin) see the value, and that read is audited.
    full = await client.get(f"{base}/configs/db", headers=account.headers)
    assert full.json()["value"]["password"] == SECRET
    viewer = {"Authorization": f"Bearer {await api_key(client, account, 'viewer')}"}
    for path in ("/configs/db", "/configs", "/versions/1"):
        seen = await client.get(base + path, headers=viewer)
        assert seen.status_code == 200
        assert SECRET not in seen.text
        assert "$secret" in seen.text  # a commitment stands in for the value
    diff = await client.get(f"{base}/diff", params={"from": 0, "to": 1}, headers=account.headers)
    assert SECRET not in diff.text
    plain = await client_key(client, account, base)
    allowed = await client_key(client, account, base, secrets=True)
    no = await client.get("/v1/client/config", headers={"Authorization": f"Bearer {plain}"})
    assert SECRET not in no.text
    yes = await client.get("/v1/client/config", headers={"Authorization": f"Bearer {allowed}"})
    assert yes.json()["config"]["db"]["password"] == SECRET
    events = (await client.get("/v1/audit-events", headers=account.headers)).json()["data"]
    reads = [e for e in events if e["action"] == "config.secrets_read"]
    assert {e["actor_type"] for e in reads} == {"user", "client_key"}
    # A viewer may not mint a key that reads secrets.
    refused = await client.post(
        f"{base}/client-keys", json={"name": "x", "secrets": True}, headers=viewer
    )
    assert refused.status_code == 403
    # The database holds no cleartext anywhere in the configs tables.
    platform = app.state.platform
    async with platform.db.engine.connect() as conn:
        for table in ("config_versions", "config_version_secrets", "audit_events"):
            rows = (await conn.execute(text(f"SELECT * FROM {table}"))).all()  # noqa: S608
            assert rows
            assert SECRET not in repr(rows), table
    assert SECRET not in caplog.text


async def test_key_rotation_rewraps_version_secrets_without_touching_versions(
    app: FastAPI, client: httpx.AsyncClient, account: Account
) -> None:
    base = await _db_setup(client, account)
    platform = app.state.platform
    async with platform.db.engine.connect() as conn:
        before = (await conn.execute(text("SELECT token FROM config_version_secrets"))).scalar()
        versions = (await conn.execute(text("SELECT hash FROM config_versions"))).all()
    stored = json.loads((Path(platform.settings.data_dir) / "master.key").read_text())
    keys = {kid: base64.b64decode(v) for kid, v in stored["keys"].items()}
    ring = KeyRing({**keys, "next": os.urandom(32)}, "next")
    await rewrap_all(platform.db, ring)
    async with platform.db.engine.connect() as conn:
        after = (await conn.execute(text("SELECT token FROM config_version_secrets"))).scalar()
        assert (await conn.execute(text("SELECT hash FROM config_versions"))).all() == versions
    assert before != after
    assert after.split(".")[1] == "next"
    assert before.split(".")[3] == after.split(".")[3]  # the sealed values are untouched
    platform.keyring = ring
    full = await client.get(f"{base}/configs/db", headers=account.headers)
    assert full.json()["value"]["password"] == SECRET
    verify = await client.get(f"{base}/verify", headers=account.headers)
    assert verify.json()["ok"] is True


async def test_concurrent_writers_with_one_etag_exactly_one_wins(
    client: httpx.AsyncClient, account: Account
) -> None:
    pid = await project(client, account)
    base = env_path(pid, await environment(client, account, pid, "prod"))
    first = await put(client, account, base, "k", {"value": 0})
    etag = first.headers["etag"]
    answers = await asyncio.gather(
        *(put(client, account, base, "k", {"value": n}, **{"If-Match": etag}) for n in range(1, 9))
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] + [412] * 7, [a.text for a in answers]
    versions = (await client.get(f"{base}/versions", headers=account.headers)).json()["data"]
    assert [v["revision"] for v in versions] == [2, 1]
    # Unconditional writers all land, each on its own revision, chain intact.
    await asyncio.gather(*(put(client, account, base, "k", {"value": n}) for n in range(6)))
    env = (await client.get(base, headers=account.headers)).json()
    assert env["revision"] == 8
    assert (await client.get(f"{base}/verify", headers=account.headers)).json()["ok"] is True


async def test_versions_are_append_only_in_the_database(
    app: FastAPI, client: httpx.AsyncClient, account: Account
) -> None:
    await _db_setup(client, account)
    for sql in ("UPDATE config_versions SET message = 'forged'", "DELETE FROM config_versions"):
        with pytest.raises(DBAPIError, match="append-only"):
            async with app.state.platform.db.engine.begin() as conn:
                await conn.execute(text(sql))
