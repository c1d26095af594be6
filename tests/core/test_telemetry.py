"""Metrics, JSON logs and tracing from `relayport.core.telemetry`, through HTTP on tiny apps."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import APIRouter, FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from relayport.core import errors
from relayport.core.context import tenant_id_var
from relayport.core.edge import EdgeMiddleware
from relayport.core.telemetry import (
    REGISTRY,
    JsonFormatter,
    LogHandler,
    TracingMiddleware,
    configure_logging,
    configure_tracing,
    metrics_response,
    shutdown_tracing,
    uvicorn_log_config,
)
from relayport.core.telemetry import tracing as tracing_module
from relayport.settings import TelemetrySettings

log = logging.getLogger("relayport.test")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def routed_app() -> FastAPI:
    """Routes under prefixes applied at include time, nested, mounted and built-in."""
    app = FastAPI()
    errors.install(app)
    keys = APIRouter(prefix="/api-keys")

    @keys.get("/{key_id}")
    async def get_key(key_id: str) -> dict[str, str]:
        log.info("key read", extra={"event": "test.key_read", "key_id": key_id, "odd": object()})
        return {"key_id": key_id}

    v1 = APIRouter()
    v1.include_router(keys)
    app.include_router(v1, prefix="/v1")

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/metrics")
    async def metrics() -> Response:
        return metrics_response()

    app.mount("/mnt", Starlette(routes=[Route("/s/{z}", lambda r: PlainTextResponse("s"))]))
    return app


def client(app: ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def count(route: str, method: str = "GET", status: str = "200") -> float:
    labels = {"route": route, "method": method, "status": status}
    return REGISTRY.get_sample_value("http_requests_total", labels) or 0.0


# --- metrics ----------------------------------------------------------------------------------


async def test_request_counter_uses_the_route_template_and_increments() -> None:
    app = routed_app()
    app.add_middleware(EdgeMiddleware)
    before = count("/v1/api-keys/{key_id}")
    observed = REGISTRY.get_sample_value(
        "http_request_duration_seconds_count", {"route": "/v1/api-keys/{key_id}", "method": "GET"}
    )
    async with client(app) as c:
        assert (await c.get("/v1/api-keys/key_1")).status_code == 200
        assert (await c.get("/v1/api-keys/key_2")).status_code == 200
    assert count("/v1/api-keys/{key_id}") == before + 2
    assert (
        REGISTRY.get_sample_value(
            "http_request_duration_seconds_count",
            {"route": "/v1/api-keys/{key_id}", "method": "GET"},
        )
        == (observed or 0) + 2
    )
    assert count("/v1/api-keys/key_1") == 0  # never the raw path
    assert count("/api-keys/{key_id}") == 0  # nor the template without the include prefix


@pytest.mark.parametrize(
    ("path", "route", "status"),
    [
        ("/items/7", "/items/{item_id}", "200"),
        ("/items/not-a-number", "/items/{item_id}", "422"),
        ("/mnt/s/x", "/mnt/s/{z}", "200"),
        ("/mnt/nothing/here", "/mnt/{path}", "404"),
        ("/docs", "/docs", "200"),
        ("/no/such/path", "unmatched", "404"),
        ("/boom", "/boom", "500"),
    ],
)
async def test_route_label(path: str, route: str, status: str) -> None:
    app = routed_app()
    app.add_middleware(EdgeMiddleware)
    before = count(route, status=status)
    async with client(app) as c:
        r = await c.get(path)
    assert str(r.status_code) == status
    assert count(route, status=status) == before + 1


async def test_unknown_methods_share_one_label() -> None:
    app = routed_app()
    app.add_middleware(EdgeMiddleware)
    before = count("/items/{item_id}", method="_OTHER", status="405")
    async with client(app) as c:
        r = await c.request("BREW", "/items/1")
    assert r.status_code == 405
    assert count("/items/{item_id}", method="_OTHER", status="405") == before + 1


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    app = routed_app()
    app.add_middleware(EdgeMiddleware)
    async with client(app) as c:
        await c.get("/items/1")
        r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE http_requests_total counter" in text
    assert 'http_requests_total{method="GET",route="/items/{item_id}",status="200"}' in text
    assert (
        'http_request_duration_seconds_bucket{le="0.001",method="GET",route="/items/{item_id}"}'
        in text
    )
    assert "process_cpu_seconds_total" in text or sys.platform != "linux"


async def test_a_request_the_client_abandons_counts_as_499() -> None:
    started = asyncio.Event()
    app = routed_app()

    @app.get("/slow")
    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    app.add_middleware(EdgeMiddleware)
    before = count("/slow", status="499")
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/slow",
        "raw_path": b"/slow",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "scheme": "http",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent for an abandoned request")

    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert count("/slow", status="499") == before + 1


# --- logs -------------------------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger and uvicorn's loggers however a test reconfigured them."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access"]
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in names}
    propagate = {n: logging.getLogger(n).propagate for n in names}
    yield
    for n, (handlers, level) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate[n]


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines() if line]


async def test_the_debug_request_line_carries_the_request_id(root_logging: None) -> None:
    buffer = io.StringIO()
    configure_logging(TelemetrySettings(log_level="DEBUG", log_json=True), stream=buffer)
    app = routed_app()
    app.add_middleware(EdgeMiddleware)
    async with client(app) as c:
        assert (await c.get("/items/3", headers={"X-Request-ID": "req-dbg"})).status_code == 200
    line = next(doc for doc in json_lines(buffer) if doc.get("event") == "http.request")
    assert line["request_id"] == "req-dbg"
    assert line["route"] == "/items/{item_id}"
    assert line["status"] == 200


async def test_json_log_line_carries_the_request_id(root_logging: None) -> None:
    buffer = io.StringIO()
    configure_logging(TelemetrySettings(log_level="INFO", log_json=True), stream=buffer)
    app = routed_app()
    app.add_middleware(EdgeMiddleware)
    async with client(app) as c:
        r = await c.get("/v1/api-keys/key_9", headers={"X-Request-ID": "req-abc"})
    assert r.status_code == 200
    line = next(doc for doc in json_lines(buffer) if doc.get("event") == "test.key_read")
    assert line["request_id"] == "req-abc"
    assert line["message"] == "key read"
    assert line["level"] == "INFO"
    assert line["logger"] == "relayport.test"
    assert line["key_id"] == "key_9"
    assert line["odd"].startswith("<object object")  # not serializable: its str()
    assert line["time"].endswith("Z")
    assert line["time"][:4].isdigit()


def record(msg: str = "m", args: Any = (), **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("relayport.x", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    "rec",
    [
        record(big=2**80),
        record(nested={"n": 2**80, 1: "non-str key"}),
        record(surrogate="\ud800"),
        record(bad=Unprintable()),
        record(collection={1, 2}),
        record("%d items", ("many",)),
    ],
    ids=["huge-int", "nested", "surrogate", "unprintable", "set", "bad-args"],
)
def test_json_formatter_never_raises(rec: logging.LogRecord) -> None:
    doc = orjson.loads(JsonFormatter().format(rec))
    assert doc["level"] == "WARNING"
    assert doc["message"]


def test_json_formatter_adds_context_and_traceback() -> None:
    token = tenant_id_var.set("ten_1")
    try:
        try:
            raise ValueError("bad value")
        except ValueError:
            rec = logging.LogRecord(
                "relayport.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
            )
        rec.event = "x.failed"
        doc = orjson.loads(JsonFormatter().format(rec))
    finally:
        tenant_id_var.reset(token)
    assert doc["tenant_id"] == "ten_1"
    assert "request_id" not in doc
    assert doc["event"] == "x.failed"
    assert "ValueError: bad value" in doc["exc"]


def test_configure_logging_is_idempotent_and_can_log_text(root_logging: None) -> None:
    buffer = io.StringIO()
    configure_logging(TelemetrySettings(log_json=True), stream=io.StringIO())
    configure_logging(TelemetrySettings(log_json=False, log_level="DEBUG"), stream=buffer)
    root = logging.getLogger()
    assert sum(isinstance(h, LogHandler) for h in root.handlers) == 1
    assert root.level == logging.DEBUG
    log.info("plain", extra={"event": "test.plain"})
    line = buffer.getvalue().strip()
    assert "INFO" in line
    assert "relayport.test: plain" in line
    assert "event=test.plain" in line
    assert not line.startswith("{")


def test_uvicorn_loggers_flow_through_the_root_handler(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = uvicorn_log_config(TelemetrySettings(log_level="INFO"))
    logging.config.dictConfig(config)  # what uvicorn does with log_config=
    logging.getLogger("uvicorn.error").info(
        "Started server process", extra={"color_message": "Started \x1b[36mserver\x1b[0m"}
    )
    logging.getLogger("uvicorn.access").info("GET /secret?token=x")  # below WARNING: dropped
    lines = [orjson.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert [doc["logger"] for doc in lines] == ["uvicorn.error"]
    assert lines[0]["message"] == "Started server process"
    assert "color_message" not in lines[0]


# --- tracing ----------------------------------------------------------------------------------


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def traced(app: FastAPI, provider: TracerProvider) -> FastAPI:
    app.add_middleware(TracingMiddleware, tracer_provider=provider)
    app.add_middleware(EdgeMiddleware)
    return app


async def test_server_span_continues_the_incoming_trace(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app = traced(routed_app(), provider)
    async with client(app) as c:
        r = await c.get(
            "/items/42",
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Request-ID": "req-t"},
        )
    assert r.status_code == 200
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None
    assert span.parent.span_id == int(PARENT_ID, 16)
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET /items/{item_id}"
    attrs = dict(span.attributes or {})
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/items/42"
    assert attrs["http.route"] == "/items/{item_id}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["relayport.request_id"] == "req-t"


async def test_span_without_traceparent_starts_a_trace_and_marks_errors(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app = traced(routed_app(), provider)
    async with client(app) as c:
        await c.get("/boom")
        await c.get("/nowhere")
    boom, nowhere = exporter.get_finished_spans()
    assert boom.parent is None
    assert boom.name == "GET /boom"
    assert boom.status.status_code is StatusCode.ERROR
    assert dict(boom.attributes or {})["http.response.status_code"] == 500
    assert nowhere.name == "GET"  # no template, and never the raw path
    assert "http.route" not in dict(nowhere.attributes or {})
    assert nowhere.status.status_code is StatusCode.UNSET  # 4xx is not a server error


async def test_log_lines_inside_a_span_carry_its_trace_id(
    spans: tuple[TracerProvider, InMemorySpanExporter], root_logging: None
) -> None:
    provider, exporter = spans
    buffer = io.StringIO()
    configure_logging(TelemetrySettings(), stream=buffer)
    app = traced(routed_app(), provider)
    async with client(app) as c:
        await c.get("/v1/api-keys/k", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    line = next(doc for doc in json_lines(buffer) if doc.get("event") == "test.key_read")
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == f"{exporter.get_finished_spans()[0].context.span_id:016x}"


async def test_tracing_off_is_a_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing_module, "_provider", None)
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    middleware = TracingMiddleware(routed_app())
    assert middleware._tracer() is None
    async with client(middleware) as c:
        assert (await c.get("/items/1")).status_code == 200


async def test_fastapi_native_span_is_not_doubled(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    native = FastAPI(telemetry={"tracer_provider": provider, "operation_spans": False})

    @native.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    native.add_middleware(TracingMiddleware, tracer_provider=provider)
    async with client(native) as c:
        await c.get("/items/3")
    server = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(server) == 1


def test_configure_tracing_is_off_without_an_endpoint() -> None:
    assert configure_tracing(TelemetrySettings()) is None


def test_configure_tracing_builds_an_otlp_provider() -> None:
    settings = TelemetrySettings(otlp_endpoint="http://127.0.0.1:9", service_name="relayport-t")
    provider = configure_tracing(settings, set_global=False)
    try:
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "relayport-t"
        assert tracing_module._provider is provider
        assert tracing_module._traces_url("http://c:4318") == "http://c:4318/v1/traces"
        assert tracing_module._traces_url("http://c:4318/custom") == "http://c:4318/custom"
    finally:
        shutdown_tracing()
    assert tracing_module._provider is None
