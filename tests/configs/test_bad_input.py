"""Outside input to the configs API is answered with 2xx or a 4xx problem, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.configs.helpers import env_path, environment, project, put
from tests.conftest import Account

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)
schemas = st.dictionaries(
    st.sampled_from(["type", "properties", "items", "x-secret", "writeOnly", "$ref", "enum",
                     "minimum", "required", "additionalProperties", "$schema"]),
    values, max_size=4,
)  # fmt: skip
SLOW = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _ok(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"


@pytest.fixture
async def base(client: httpx.AsyncClient, account: Account) -> str:
    pid = await project(client, account)
    return env_path(pid, await environment(client, account, pid, "prod"))


@pytest.mark.parametrize("backend", ["sqlite"])
@SLOW
@given(value=values, schema=st.none() | schemas)
async def test_any_value_and_schema_is_stored_or_refused(
    backend: str, client: httpx.AsyncClient, account: Account, base: str, value: Any, schema: Any
) -> None:
    body: dict[str, Any] = {"value": value}
    if schema is not None:
        body["schema"] = schema
    _ok(await put(client, account, base, "k", body))
    _ok(await client.get(f"{base}/configs", headers=account.headers))


@pytest.mark.parametrize("backend", ["sqlite"])
@SLOW
@given(ops=st.lists(st.dictionaries(st.sampled_from(["op", "path", "from", "value"]), values)))
async def test_any_patch_is_applied_or_refused(
    backend: str, client: httpx.AsyncClient, account: Account, base: str, ops: Any
) -> None:
    await put(client, account, base, "k", {"value": {"a": [1, 2]}})
    response = await client.patch(f"{base}/configs/k", json=ops, headers=account.headers)
    _ok(response)


async def test_odd_inputs_on_both_backends(
    client: httpx.AsyncClient, account: Account, base: str
) -> None:
    h = {**account.headers, "content-type": "application/json"}
    cases = [
        ("PUT", "/configs/k", b'{"value": NaN}'),
        ("PUT", "/configs/k", b'{"value": "nul\\u0000byte", "message": "m"}'),
        ("PUT", "/configs/k", b'{"value": {"\\u0000": 1}}'),
        ("PUT", "/configs/k", b'{"value": 123456789012345678901234567890}'),
        ("PUT", "/configs/k", b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("PUT", "/configs/bad%2Fkey", b'{"value": 1}'),
        ("PUT", "/configs/k", b'{"value": 1, "schema": {"$ref": "http://example.com/s"}}'),
        ("PATCH", "/configs/k", b'{"op": "add"}'),
        ("POST", "/rollback", b'{"to_revision": 99999999999}'),
        ("POST", "/promote", b'{"to": "nowhere"}'),
    ]
    for method, path, body in cases:
        _ok(await client.request(method, base + path, content=body, headers=h))
    for params in ({"from": -1, "to": 0}, {"from": 0, "to": 10**12}, {"from": 5, "to": 0}):
        _ok(await client.get(f"{base}/diff", params=params, headers=account.headers))
    for path in ("/versions/99999999999", "/versions/abc/propagation", "/versions?after=x"):
        _ok(await client.get(base + path, headers=account.headers))
    stream = await client.get(
        "/v1/client/stream", params={"since": -5}, headers={"Authorization": "Bearer rpc_x"}
    )
    _ok(stream)
