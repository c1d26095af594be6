"""Request-level protection: ids, security headers, body and concurrency limits, client IPs, CORS.

Everything here is pure ASGI; see `middleware` for the order the app factory stacks them in.
"""

from relayport.core.security.client_ip import ClientIpMiddleware, client_ip, parse_networks
from relayport.core.security.middleware import (
    API_CSP,
    DOCS_CSP,
    PROBE_PATHS,
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    InFlightGate,
    ProblemCORSMiddleware,
    RequestIdMiddleware,
    SecurityHeadersMiddleware,
    cors_kwargs,
    send_problem,
)

__all__ = [
    "API_CSP",
    "DOCS_CSP",
    "PROBE_PATHS",
    "BodyLimitMiddleware",
    "ClientIpMiddleware",
    "ConcurrencyLimitMiddleware",
    "InFlightGate",
    "ProblemCORSMiddleware",
    "RequestIdMiddleware",
    "SecurityHeadersMiddleware",
    "client_ip",
    "cors_kwargs",
    "parse_networks",
    "send_problem",
]
