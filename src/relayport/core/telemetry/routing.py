"""The route template a request matched (`/v1/api-keys/{key_id}`), for metric labels and span names.

Labels must come from templates, never raw paths: one label value per id would grow the
registry without bound. Read it after the app ran, from what routing left in the scope.

Why not simply `scope["route"].path`: FastAPI 0.165 no longer copies routes of included routers
under the prefixed path. `scope["route"]` is the router's own route, so a router included with
a prefix (or nested in another) reports `/{key_id}` without `/v1/api-keys`. The prefixed
template lives in the route context FastAPI keeps in `scope["fastapi"]`; its own telemetry reads
the same field. Plain Starlette routes added to a FastAPI app (`/docs`, `/openapi.json`) set
no `scope["route"]` at all, only `scope["endpoint"]`.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Mount
from starlette.types import Scope

UNMATCHED = "unmatched"


def _template_of(route: Any) -> str | None:
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else None


def _fastapi_template(scope: Scope) -> str | None:
    # FastAPI's private per-request state; guarded so a change in it degrades to the
    # fallbacks below instead of failing requests. tests/core/test_telemetry.py pins it.
    state = scope.get("fastapi")
    if not isinstance(state, dict):
        return None
    context = state.get("effective_route_context")
    if context is None:
        return None
    return _template_of(getattr(context, "starlette_route", None)) or _template_of(context)


def _endpoint_template(scope: Scope) -> str | None:
    endpoint = scope.get("endpoint")
    router = scope.get("router")
    if endpoint is None or router is None:
        return None
    found = [
        r
        for r in getattr(router, "routes", ())
        if getattr(r, "endpoint", None) is endpoint and not isinstance(r, Mount)
    ]
    if len(found) == 1:
        return _template_of(found[0])
    return None  # shared or unknown endpoint: better unmatched than a wrong label


def route_template(scope: Scope, root_path: str = "") -> str | None:
    """The template of the route that handled the request, None if nothing matched.

    `root_path` is `scope["root_path"]` as it was before the app ran: what Mounts added to
    it since is part of the template (`/ui/static/{path}`).
    """
    current: str = scope.get("root_path", "")
    mount_prefix = current[len(root_path) :] if current.startswith(root_path) else ""
    route = scope.get("route")
    leaf = _fastapi_template(scope)
    if leaf is None and route is not None and not isinstance(route, Mount):
        leaf = _template_of(route)
    if leaf is None:
        leaf = _endpoint_template(scope)
    if leaf is not None:
        return mount_prefix + leaf
    if mount_prefix:
        # Inside a mount that has no routes of its own (static files, a sub-app's 404).
        return mount_prefix + "/{path}"
    return None
