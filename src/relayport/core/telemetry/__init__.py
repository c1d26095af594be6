"""Telemetry: Prometheus metrics on one registry, JSON logs with request ids, OpenTelemetry traces.

`metrics` holds `REGISTRY` (every module's metrics go there) and the HTTP request metrics,
`logs` the stdlib logging set-up, `tracing` the OTLP exporter and the span middleware, and
`routing` the route-template lookup the last two share.
"""

from relayport.core.telemetry.logs import (
    JsonFormatter,
    LogHandler,
    TextFormatter,
    configure_logging,
    uvicorn_log_config,
)
from relayport.core.telemetry.metrics import (
    DURATION_BUCKETS,
    HTTP_DURATION,
    HTTP_REQUESTS,
    REGISTRY,
    metrics_response,
    record_request,
)
from relayport.core.telemetry.routing import UNMATCHED, route_template
from relayport.core.telemetry.tracing import TracingMiddleware, configure_tracing, shutdown_tracing

__all__ = [
    "DURATION_BUCKETS",
    "HTTP_DURATION",
    "HTTP_REQUESTS",
    "REGISTRY",
    "UNMATCHED",
    "JsonFormatter",
    "LogHandler",
    "TextFormatter",
    "TracingMiddleware",
    "configure_logging",
    "configure_tracing",
    "metrics_response",
    "record_request",
    "route_template",
    "shutdown_tracing",
    "uvicorn_log_config",
]
