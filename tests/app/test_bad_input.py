"""Bad input gets a 4xx problem+json, never a 500, and never stores anything half."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Account
from tests.core.test_auth import assert_problem


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/auth/signup", content=b'{"email": ', headers={"content-type": "application/json"}
    )
    assert_problem(response, 400, "malformed-json")


async def test_validation_errors_list_every_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/auth/signup", json={"email": "not-an-email", "password": 5, "colour": "red"}
    )
    assert_problem(response, 422, "validation-error")
    pointers = {e["pointer"] for e in response.json()["errors"]}
    assert pointers == {"/email", "/password", "/colour"}


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    big = b'{"email": "' + b"a" * 2_000_000 + b'"}'
    response = await client.post(
        "/v1/auth/signup", content=big, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "payload-too-large")


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("Robert'); DROP TABLE api_keys;--", True),
        ("<script>alert(1)</script>", True),
        ("\u202eevil\u200f", True),
        ("名前 😀", True),
        ("nul\x00byte", False),
        ("bell\x07", False),
        ("x" * 10_000, False),
        ("", False),
    ],
)
async def test_odd_names_are_plain_data_or_refused(
    client: httpx.AsyncClient, account: Account, name: str, stored: bool
) -> None:
    response = await client.post("/v1/api-keys", json={"name": name}, headers=account.headers)
    if stored:
        assert response.status_code == 201, response.text
        fetched = await client.get(f"/v1/api-keys/{response.json()['id']}", headers=account.headers)
        assert fetched.json()["name"] == name
    else:
        assert_problem(response, 422, "validation-error")
    listed = await client.get("/v1/api-keys", headers=account.headers)
    assert len(listed.json()["data"]) == (1 if stored else 0)


async def test_wrong_types_and_unknown_fields_are_refused(
    client: httpx.AsyncClient, account: Account
) -> None:
    for body in ({"name": 5}, {"name": "k", "role": "root"}, {"name": "k", "scopes": ["x"]}):
        response = await client.post("/v1/api-keys", json=body, headers=account.headers)
        assert_problem(response, 422)
    assert (await client.get("/v1/api-keys", headers=account.headers)).json()["data"] == []


async def test_bad_pagination_is_4xx(client: httpx.AsyncClient, account: Account) -> None:
    cases = [
        ({"limit": 0}, "limit", "greater_than_equal"),
        ({"limit": 10_000}, "limit", "less_than_equal"),
        ({"limit": "many"}, "limit", "int_parsing"),
        ({"limit": "1e3"}, "limit", "int_parsing"),
        ({"after": "x" * 100}, "after", "string_too_long"),
    ]
    for path in ("/v1/api-keys", "/v1/users"):
        for params, field, code in cases:
            response = await client.get(path, params=params, headers=account.headers)
            assert_problem(response, 422)
            [error] = response.json()["errors"]
            assert error["pointer"] == f"#query/{field}", (path, params, error)
            assert error["code"] == code


async def test_pages_follow_the_next_cursor(client: httpx.AsyncClient, account: Account) -> None:
    made = []
    for i in range(3):
        created = await client.post(
            "/v1/api-keys", json={"name": f"k{i}", "role": "viewer"}, headers=account.headers
        )
        made.append(created.json()["id"])
    seen: list[str] = []
    params: dict[str, str | int] = {"limit": 2}
    while True:
        page = (await client.get("/v1/api-keys", params=params, headers=account.headers)).json()
        seen += [k["id"] for k in page["data"]]
        if page["next"] is None:
            break
        params = {"limit": 2, "after": page["next"]}
    assert len(seen) == len(set(seen))
    assert set(made) <= set(seen)
    assert seen == sorted(seen, reverse=True)  # newest first
    unknown = await client.get("/v1/api-keys", params={"foo": "1"}, headers=account.headers)
    assert unknown.status_code == 200  # other query parameters are ignored, as before


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nothing-here"), 404, "not-found")
    assert_problem(await client.put("/v1/auth/login"), 405, "method-not-allowed")


async def test_server_keeps_serving_after_bad_input(client: httpx.AsyncClient) -> None:
    for raw in (b"\xff\xfe", b"[]", b"null", b'{"email": null}', b"{" * 5000):
        response = await client.post(
            "/v1/auth/login", content=raw, headers={"content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500, (raw[:10], response.text)
    assert (await client.get("/healthz")).status_code == 200


async def test_nul_in_the_url_is_refused_before_any_route(
    client: httpx.AsyncClient, account: Account
) -> None:
    """PostgreSQL refuses NUL in text; no id, cursor or filter can hold one."""
    for path in (
        "/v1/api-keys?after=%00x",
        "/v1/api-keys/%00x",
        "/v1/users?after=a%00",
        "/v1/endpoints/ep%00",
        "/v1/audit-events?action=%00",
    ):
        response = await client.get(path, headers=account.headers)
        assert_problem(response, 400, "invalid-characters")
        assert response.headers["x-request-id"]
    assert (await client.get("/v1/api-keys", headers=account.headers)).status_code == 200
