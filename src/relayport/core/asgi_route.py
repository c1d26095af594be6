"""Routes declared by FastAPI and served by a plain ASGI function.

FastAPI's request handling (a Request, two exit stacks, dependency solving, per-route exception
wrapping, a Response object) costs ~20 to 30 µs per request on this machine, more than the whole
work of the few hottest routes. `served_by(fn)` keeps the route's FastAPI declaration (path,
methods, OpenAPI entry, response model in the docs) and serves requests with `fn` instead.
Errors raised by `fn` reach the app's exception handlers through Starlette's
ExceptionMiddleware, as every route's do, so answers are the same problem+json.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi._body_limit import wrap_app_with_body_limit
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send


def served_by(serve: ASGIApp) -> type[APIRoute]:
    """A route class (for `route_class_override=`) whose requests go to `serve`."""

    class AsgiRoute(APIRoute):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.dependant.dependencies:
                # They would be documented (security schemes included) and never run.
                raise TypeError(
                    f"{self.path}: a route served by a plain ASGI function cannot have "
                    "dependencies (on the route or its router); check them in the function"
                )
            # As APIRoute wraps its own handler (a no-op unless the route sets max_body_size).
            self.app = wrap_app_with_body_limit(serve, self.max_body_size)

    AsgiRoute.__name__ = AsgiRoute.__qualname__ = f"AsgiRoute[{getattr(serve, '__name__', '')}]"
    return AsgiRoute


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with an already-encoded JSON body."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", b"%d" % len(body)),
                (b"content-type", b"application/json"),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def add_json_route(
    router: APIRouter, path: str, answer: Callable[[Request], Awaitable[bytes]], **declared: Any
) -> None:
    """Declare `path` on `router` like `router.add_api_route(path, answer, **declared)` would
    (name, docstring, response model, OpenAPI entry) and serve it with `answer`, which returns
    the encoded JSON body of a 200 (or raises, as any route does)."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, await answer(Request(scope, receive)))

    # What FastAPI documents; it also serves the route where FastAPI rebuilds routes itself.
    async def endpoint(request: Request) -> Response:
        return Response(await answer(request), media_type="application/json")

    ignored = set(declared) - _DOCUMENTING
    if ignored:
        raise TypeError(f"{path}: {sorted(ignored)} would be ignored: the answer is a plain 200")
    endpoint.__name__ = answer.__name__
    endpoint.__doc__ = answer.__doc__
    router.add_api_route(path, endpoint, route_class_override=served_by(serve), **declared)


# What add_json_route passes on: options that only describe the route. Any other (a status
# code, a response class, response-model filtering, dependencies) would do nothing.
_DOCUMENTING = frozenset(
    {
        "methods",
        "response_model",
        "tags",
        "summary",
        "description",
        "responses",
        "deprecated",
        "operation_id",
        "include_in_schema",
        "name",
        "openapi_extra",
    }
)
