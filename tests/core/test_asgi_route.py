"""Routes declared to FastAPI and served by a plain ASGI function (`core.asgi_route`)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from relayport.core.asgi_route import add_json_route


class Answer(BaseModel):
    greeting: str


class Refused(Exception):
    pass


def _app(*, flatten: bool = True) -> tuple[FastAPI, list[str]]:
    seen: list[str] = []
    router = APIRouter(prefix="/v1")

    async def greet(request: Request) -> bytes:
        """Says hello."""
        name = request.query_params.get("name", "")
        if name == "nobody":
            raise Refused
        seen.append(type(request).__name__)
        return b'{"greeting":"hello %s"}' % name.encode()

    add_json_route(router, "/greet", greet, methods=["GET"], response_model=Answer, tags=["t"])
    app = FastAPI()
    if flatten:  # as relayport.app.add_routes does
        app.router.routes.extend(router.routes)
    else:
        app.include_router(router)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"type": "refused"}, status_code=403)

    app.add_exception_handler(Refused, refused)
    return app, seen


async def test_the_route_answers_its_bytes_and_is_documented_as_declared() -> None:
    app, seen = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/v1/greet", params={"name": "ada"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"greeting": "hello ada"}
    assert seen == ["Request"]
    route = next(r for r in app.routes if getattr(r, "path", "") == "/v1/greet")
    assert type(route).__name__ == "AsgiRoute[serve]"
    operation = app.openapi()["paths"]["/v1/greet"]["get"]
    assert operation["description"] == "Says hello."
    assert operation["operationId"] == "greet_v1_greet_get"
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/Answer"}


async def test_an_included_router_serves_the_same_answer() -> None:
    """FastAPI wraps included routers in a layer of its own; the route still answers."""
    app, _ = _app(flatten=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/v1/greet", params={"name": "ada"})
    assert response.status_code == 200
    assert response.json() == {"greeting": "hello ada"}


async def test_errors_reach_the_apps_exception_handlers() -> None:
    app, _ = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/v1/greet", params={"name": "nobody"})
    assert response.status_code == 403
    assert response.json() == {"type": "refused"}


async def test_other_methods_are_still_405() -> None:
    app, _ = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/v1/greet")
    assert response.status_code == 405


async def _answer(request: Request) -> bytes:
    return b"{}"


def test_a_route_with_dependencies_is_refused_as_they_would_never_run() -> None:
    async def deny() -> None:
        raise RuntimeError("never reached")

    with pytest.raises(TypeError, match="dependencies"):
        add_json_route(APIRouter(dependencies=[Depends(deny)]), "/x", _answer, methods=["GET"])
    with pytest.raises(TypeError, match="dependencies"):
        add_json_route(APIRouter(), "/x", _answer, methods=["GET"], dependencies=[Depends(deny)])


def test_options_that_would_be_ignored_are_refused() -> None:
    with pytest.raises(TypeError, match="status_code"):
        add_json_route(APIRouter(), "/x", _answer, methods=["POST"], status_code=201)
