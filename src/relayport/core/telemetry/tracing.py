"""OpenTelemetry traces: an OTLP/HTTP exporter when configured, a server span per HTTP request.

Off unless `telemetry.otlp_endpoint` is set; then the middleware costs one provider lookup per
request and nothing else.

FastAPI 0.165 has its own tracing that switches itself on as soon as a global tracer provider
exists (`FastAPI(telemetry=...)`). It runs outside the middleware stack; when it has opened a
server span for a request, `TracingMiddleware` steps aside rather than open a second one. The
app factory should pass `telemetry={"tracing": False}` so the span is ours: same route template
as the metrics, and the request id on it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relayport import __version__
from relayport.core.telemetry.metrics import CLIENT_CLOSED, KNOWN_METHODS
from relayport.core.telemetry.routing import route_template
from relayport.settings import TelemetrySettings

log = logging.getLogger("relayport.telemetry")

_provider: TracerProvider | None = None


def _traces_url(endpoint: str) -> str:
    # Accept the collector's base URL as well as the full one: the OTLP convention appends
    # /v1/traces to a base endpoint, and a bare host:4318 would otherwise 404 on every export.
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def configure_tracing(
    settings: TelemetrySettings,
    *,
    exporter: SpanExporter | None = None,
    set_global: bool = True,
) -> TracerProvider | None:
    """An SDK provider exporting in batches over OTLP/HTTP; None when tracing is off.

    `exporter` replaces the OTLP one (tests). The first provider configured in a process also
    becomes the global one, so library instrumentation and `trace.get_tracer()` use it;
    OpenTelemetry allows setting that only once per process.
    """
    global _provider
    if settings.otlp_endpoint is None and exporter is None:
        return None
    if exporter is None:
        assert settings.otlp_endpoint is not None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=_traces_url(settings.otlp_endpoint), timeout=5)
    provider = TracerProvider(
        resource=Resource.create(
            {SERVICE_NAME: settings.service_name, SERVICE_VERSION: __version__}
        )
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global and isinstance(trace.get_tracer_provider(), ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the provider `configure_tracing` made. Blocks for up to the exporter's
    timeout (5 s): from a running event loop, prefer `await asyncio.to_thread(shutdown_tracing)`."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def _fastapi_span_open(scope: Scope) -> bool:
    native = scope.get("fastapi.telemetry")
    return native is not None and getattr(native, "span", None) is not None


def _carrier(scope: Scope) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        # Repeated fields combine with commas (tracestate, baggage may come split).
        carrier[key] = f"{carrier[key]},{text}" if key in carrier else text
    return carrier


class TracingMiddleware:
    """A SERVER span per HTTP request, continuing an incoming W3C `traceparent`.

    Named "METHOD /route/{template}" once routing is known (just "METHOD" when nothing
    matched: raw paths would make span names unbounded). `tracer_provider` pins a provider;
    otherwise the one from `configure_tracing`, else the global one, is looked up per request,
    since the app's lifespan configures tracing after the middleware stack is built.
    """

    def __init__(
        self, app: ASGIApp, *, tracer_provider: trace.TracerProvider | None = None
    ) -> None:
        self.app = app
        self._pinned = tracer_provider
        self._cached: tuple[trace.TracerProvider, trace.Tracer] | None = None

    def _tracer(self) -> trace.Tracer | None:
        provider = self._pinned or _provider or trace.get_tracer_provider()
        if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
            return None
        if self._cached is None or self._cached[0] is not provider:
            self._cached = (provider, provider.get_tracer("relayport", __version__))
        return self._cached[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = self._tracer() if scope["type"] == "http" else None
        if tracer is None or _fastapi_span_open(scope):
            await self.app(scope, receive, send)
            return
        root_path: str = scope.get("root_path", "")
        raw_method: str = scope["method"]
        method = raw_method if raw_method in KNOWN_METHODS else "_OTHER"
        name = raw_method if method != "_OTHER" else "HTTP"
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        if method == "_OTHER":
            attributes["http.request.method_original"] = raw_method
        parent = propagate.extract(_carrier(scope))
        span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        status: int | None = None

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, send_traced)
        except BaseException as exc:
            if status is None:
                status = CLIENT_CLOSED if isinstance(exc, asyncio.CancelledError) else 500
            if status >= 500:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            otel_context.detach(token)
            self._finish(span, scope, root_path, name, status or 500)

    @staticmethod
    def _finish(span: trace.Span, scope: Scope, root_path: str, name: str, status: int) -> None:
        template = route_template(scope, root_path)
        if template is not None:
            span.set_attribute("http.route", template)
            span.update_name(f"{name} {template}")
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            # Server spans: 4xx is the client's error, not ours (OTel HTTP semconv).
            span.set_status(StatusCode.ERROR)
        state = scope.get("state") or {}
        if state.get("request_id"):
            span.set_attribute("relayport.request_id", str(state["request_id"]))
        if state.get("client_ip"):
            span.set_attribute("client.address", str(state["client_ip"]))
        span.end()
