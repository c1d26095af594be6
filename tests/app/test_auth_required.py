"""Every route needs credentials unless it is public on purpose.

Most routes declare their role as a dependency; the hottest check it with `deps.authorize()`
in their body, where no tool can see it. This walk calls every operation in the OpenAPI
document without credentials, so a route that forgets its check fails here.
"""

from __future__ import annotations

import re

import httpx
from fastapi import FastAPI

from tests.core.test_auth import assert_problem

PARAM = re.compile(r"{(\w+)}")
# Public on purpose: probes, account entry points (their own body is the credential), and
# ingest, where the provider's signature decides (tests/ingest covers it).
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("POST", "/v1/auth/signup"),
    ("POST", "/v1/auth/login"),
    ("POST", "/v1/auth/refresh"),
    ("POST", "/v1/auth/logout"),
    ("POST", "/v1/ingest/{source_id}"),
}


async def test_every_other_route_refuses_a_request_without_credentials(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    walked = 0
    for template, operations in app.openapi()["paths"].items():
        path = PARAM.sub("x_1", template)
        for method in (m.upper() for m in operations):
            if (method, template) in PUBLIC:
                continue
            body = {} if method in {"POST", "PUT", "PATCH"} else None
            response = await client.request(method, path, json=body)
            assert response.status_code == 401, (method, template, response.text)
            assert_problem(response, 401)
            walked += 1
    assert walked > 40, walked  # the walk really covered the app
