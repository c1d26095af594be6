"""create_app(settings): the ASGI application with its middleware, routers and lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from relayport import __version__
from relayport.configs.routes import router as configs_router
from relayport.core import errors, gcpolicy
from relayport.core.audit_routes import router as audit_router
from relayport.core.auth.routes import router as auth_router
from relayport.core.edge import EdgeMiddleware
from relayport.core.health import router as health_router
from relayport.core.limits import RateLimitMiddleware
from relayport.core.platform import Platform
from relayport.core.route_index import index_routes
from relayport.core.security import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    InFlightGate,
    ProblemCORSMiddleware,
    SecurityHeaders,
    cors_kwargs,
)
from relayport.core.telemetry import TracingMiddleware, configure_tracing, shutdown_tracing
from relayport.delivery.routes import router as delivery_router
from relayport.ingest.routes import body_limit_for as ingest_body_limit
from relayport.ingest.routes import router as ingest_router
from relayport.runtime import build_platform, close_platform
from relayport.settings import Settings
from relayport.worker import Worker

log = logging.getLogger("relayport.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    gate = InFlightGate(settings.http.max_concurrency, settings.http.concurrency_retry_after_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tracer = configure_tracing(settings.telemetry)
        platform = await build_platform(settings)
        app.state.platform = platform
        worker = Worker(platform) if settings.embedded else None
        if worker is not None:
            await worker.start()
        if settings.gc_freeze:
            gcpolicy.freeze_started_app()
        log.info(
            "relayport ready",
            extra={
                "event": "app.started",
                "database": platform.db.dialect,
                "broker": "memory" if settings.embedded else "rabbitmq",
                "cache": "redis" if settings.redis_url else "memory",
            },
        )
        try:
            yield
        finally:
            # Uvicorn has stopped accepting; refuse what still arrives on kept-alive
            # connections and let in-flight requests finish within the bound.
            app.state.draining = True
            gate.start_draining()
            await gate.wait_idle(settings.shutdown_timeout_s)
            if worker is not None:
                await worker.stop(settings.shutdown_timeout_s)
            await close_platform(platform)
            if tracer is not None:
                await asyncio.to_thread(shutdown_tracing)
            log.info("relayport stopped", extra={"event": "app.stopped"})

    app = FastAPI(
        title="Relayport",
        version=__version__,
        summary="Inbound and outbound webhooks, detection, live configuration, LLM gateway.",
        lifespan=lifespan,
        # Our middleware owns metrics and spans (with request ids and route templates); FastAPI's
        # native telemetry would also look up OpenTelemetry providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.draining = False
    errors.install(app)
    for router in (
        health_router,
        auth_router,
        audit_router,
        ingest_router,
        delivery_router,
        configs_router,
    ):
        add_routes(app, router)
    index_routes(app)

    def platform() -> Platform | None:
        return getattr(app.state, "platform", None)

    # Added innermost first: the last one added sees the request first. Outermost first:
    # Edge (request id, client IP, security headers, metrics) → Tracing → CORS →
    # Concurrency → rate limit → BodyLimit → routes; refusals thus still get ids, metrics
    # and headers.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.http.body_limit_bytes,
        limit_for=ingest_body_limit,  # sources may take bodies up to 10 MiB
    )
    app.add_middleware(RateLimitMiddleware, platform=platform)
    app.add_middleware(ConcurrencyLimitMiddleware, gate=gate)
    cors = cors_kwargs(settings.http)
    if cors is not None:
        app.add_middleware(ProblemCORSMiddleware, **cors)
    if settings.telemetry.otlp_endpoint:  # off by default: then it costs nothing
        app.add_middleware(TracingMiddleware)
    app.add_middleware(
        EdgeMiddleware,
        trusted_proxies=settings.http.trusted_proxies,
        security_headers=SecurityHeaders() if settings.http.security_headers else None,
    )
    return app


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """Put a router's routes directly on the app.

    FastAPI 0.165 matches included routers through an extra layer that costs ~4 µs per route
    per request (measured: 21 routes, 203 µs direct vs 278 µs included); routers here carry
    their full paths, so nothing is lost by flattening them.
    """
    app.router.routes.extend(router.routes)


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` and multi-worker serving."""
    return create_app(Settings())
