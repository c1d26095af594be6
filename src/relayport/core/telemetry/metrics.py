"""The one Prometheus registry, the HTTP metrics (recorded by `core.edge`) and `GET /metrics`.

Every module registers its metrics on `REGISTRY` (`Counter(..., registry=REGISTRY)`), never on
prometheus_client's global default: one registry is what `/metrics` serves, and tests can read
it without picking up whatever else the process imported.

Each server process has its own registry; with `workers > 1` a scrape sees one process. Run one
process per container (the usual deployment) or scrape each worker's port.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import Scope

from relayport.core.telemetry.routing import UNMATCHED, route_template

log = logging.getLogger("relayport.http")

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# 1 ms (a cached read) to 10 s (a slow upstream LLM call); beyond that, +Inf says enough.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from request to the end of the response, by route template and method.",
    ["route", "method"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)

# A client may send any token as a method; an open label set would be a cardinality leak.
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "_OTHER"


_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def record_request(scope: Scope, root_path: str, status: int, elapsed: float) -> None:
    """Count and time one HTTP request under its route template; log it at DEBUG.

    Called by `core.edge.EdgeMiddleware` once the response is over (or the app failed: the
    server then answers 500; a client that hung up counts as 499).
    """
    route = route_template(scope, root_path) or UNMATCHED
    method = method_label(scope["method"])
    key = (route, method, status)
    children = _CHILDREN.get(key)
    if children is None:
        # `labels()` hashes and locks on every call; the label sets are few (templates,
        # not paths), so keep their children.
        children = _CHILDREN[key] = (
            HTTP_REQUESTS.labels(route, method, str(status)),
            HTTP_DURATION.labels(route, method),
        )
    children[0].inc()
    children[1].observe(elapsed)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s %s %s",
            method,
            route,
            status,
            extra={
                "event": "http.request",
                "route": route,
                "method": method,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )


def metrics_response() -> Response:
    """`GET /metrics`: the registry in Prometheus text format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
