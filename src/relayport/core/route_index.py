"""Route lookup by path prefix instead of a scan of every route.

Starlette and FastAPI find a request's route by trying each route's regex in order, so the
cost grows with the API: ~1 µs per route on this machine, paid by every request to a route near
the end of the list. `index_routes(app)` makes the app's router try only the routes whose first
two path segments can match (plus the few that cannot be indexed, such as mounts and paths
with a parameter up front), in their original order, so the first full match is the same
route as before. Anything else (405 on a partial match, slash redirects, 404) falls back to
FastAPI's own full scan, so behaviour is unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi import routing as fastapi_routing
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Receive, Scope, Send

# Private helpers of the pinned FastAPI the fast path must call exactly as APIRouter.app does;
# fail at import rather than route differently if an upgrade renames them.
_apply_router_form_limits = fastapi_routing._apply_router_form_limits
_update_scope = fastapi_routing._update_scope
_route_selected = fastapi_routing._route_selected  # type: ignore[attr-defined]

Key = tuple[str, str]


def _key(path: str) -> Key:
    parts = path.split("/", 3)  # "/v1/api-keys/x" -> ["", "v1", "api-keys", "x"]
    return (parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "")


class _Index:
    def __init__(self, routes: list[BaseRoute]) -> None:
        self.size = len(routes)
        exact: dict[Key, list[tuple[int, BaseRoute]]] = {}
        loose: list[tuple[int, BaseRoute]] = []
        for position, route in enumerate(routes):
            path = getattr(route, "path_format", None)
            if not isinstance(path, str) or isinstance(route, Mount) or "{" in "".join(_key(path)):
                loose.append((position, route))
            else:
                exact.setdefault(_key(path), []).append((position, route))
        self._exact = {
            key: [r for _, r in sorted([*items, *loose], key=lambda item: item[0])]
            for key, items in exact.items()
        }
        self._loose = [r for _, r in loose]

    def candidates(self, path: str) -> list[BaseRoute]:
        return self._exact.get(_key(path), self._loose)


class IndexedRouter(fastapi_routing.APIRouter):
    """The app's router with the prefix index in front of FastAPI's scan."""

    _route_index: _Index | None = None

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().app(scope, receive, send)
            return
        index = self._route_index
        # Routes are only ever appended (at start-up, or by tests): a new length means rebuild.
        if index is None or index.size != len(self.routes):
            index = self._route_index = _Index(list(self.routes))
        for route in index.candidates(get_route_path(scope)):
            match, child_scope = route.matches(scope)
            if match == Match.FULL:
                # What APIRouter.app does on a full match.
                _apply_router_form_limits(scope, self.form_limits)
                scope.setdefault("router", self)
                _update_scope(scope, child_scope)
                _route_selected(
                    scope=scope,
                    path=getattr(route, "path_format", None),
                    mount=isinstance(route, Mount),
                )
                await route.handle(scope, receive, send)
                return
        await super().app(scope, receive, send)


def index_routes(app: FastAPI) -> None:
    """Give `app` the indexed router (same routes, same settings, faster lookup)."""
    router: Any = app.router
    # Starlette's Router keeps its entry point as `middleware_stack`, bound at construction;
    # the app's router has no router-level middleware, so that is `APIRouter.app` itself.
    if getattr(router.middleware_stack, "__func__", None) is not fastapi_routing.APIRouter.app:
        raise RuntimeError("the app's router has its own middleware: cannot index its routes")
    router.__class__ = IndexedRouter  # a subclass that only overrides `app`
    router.middleware_stack = router.app
