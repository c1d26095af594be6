"""The route index picks exactly the route FastAPI's own scan would, and changes nothing else."""

from __future__ import annotations

import re

import httpx
from fastapi import FastAPI
from starlette.routing import Match

from relayport.app import create_app
from relayport.core.route_index import IndexedRouter, _Index, index_routes
from relayport.settings import Settings


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def _scope(method: str, path: str) -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}


def test_index_chooses_the_scans_first_full_match(tmp_path: object) -> None:
    app = create_app(Settings(data_dir=str(tmp_path), env="test"))
    assert isinstance(app.router, IndexedRouter)
    routes = list(app.router.routes)
    index = _Index(routes)
    checked = 0
    for route in routes:
        path = getattr(route, "path_format", None)
        for method in getattr(route, "methods", None) or {"GET"}:
            if path is None:
                continue
            scope = _scope(method, _concrete(path))
            scanned = next(r for r in routes if r.matches(scope)[0] == Match.FULL)
            indexed = next(
                r for r in index.candidates(scope["path"]) if r.matches(scope)[0] == Match.FULL
            )  # type: ignore[arg-type]
            assert indexed is scanned, (method, path)
            checked += 1
    assert checked >= 30


async def test_unindexed_outcomes_are_fastapis(tmp_path: object) -> None:
    """405, 404 and slash redirects still come from FastAPI's full scan."""
    app = FastAPI()

    @app.get("/v1/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    index_routes(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/v1/things/a")).json() == {"id": "a"}
        assert (await client.post("/v1/things/a")).status_code == 405
        assert (await client.get("/v1/nothing")).status_code == 404
        redirect = await client.get("/v1/things/a/")
        assert redirect.status_code == 307
        # A route added after the index was built is found too.

        @app.get("/v1/later")
        async def later() -> dict[str, bool]:
            return {"later": True}

        assert (await client.get("/v1/later")).json() == {"later": True}
