"""Request-level protection: ids, security headers, body and concurrency limits, client IPs, CORS.

Middleware here is pure ASGI; `core.edge` applies the per-request policies (ids, headers,
addresses); see `middleware` for the order the app factory stacks everything in.
"""

from relayport.core.security.client_ip import client_ip, parse_networks, resolve_client
from relayport.core.security.middleware import (
    API_CSP,
    DOCS_CSP,
    PROBE_PATHS,
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    InFlightGate,
    ProblemCORSMiddleware,
    SecurityHeaders,
    cors_kwargs,
    request_id_for,
    send_problem,
)

__all__ = [
    "API_CSP",
    "DOCS_CSP",
    "PROBE_PATHS",
    "BodyLimitMiddleware",
    "ConcurrencyLimitMiddleware",
    "InFlightGate",
    "ProblemCORSMiddleware",
    "SecurityHeaders",
    "client_ip",
    "cors_kwargs",
    "parse_networks",
    "request_id_for",
    "resolve_client",
    "send_problem",
]
