"""Probes and metrics: /healthz (the process answers), /readyz (its dependencies do), /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from relayport.core import migrate
from relayport.core.platform import Platform
from relayport.core.telemetry import metrics_response

router = APIRouter(tags=["operations"])

PROBE_TIMEOUT_S = 2.0


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """Answers while the process can serve requests."""
    return {"status": "ok"}


async def _probe(check: Awaitable[Any]) -> str:
    try:
        await asyncio.wait_for(check, PROBE_TIMEOUT_S)
    except Exception as exc:  # a probe reports failures, it never raises them
        return f"error: {type(exc).__name__}"
    return "ok"


async def _migrations(platform: Platform) -> None:
    if not await migrate.is_current(platform.db):
        raise RuntimeError("schema behind")


@router.get("/readyz", summary="Readiness")
async def readyz(request: Request) -> Response:
    """503 unless the database, Redis and the broker answer and the schema is current."""
    platform: Platform | None = getattr(request.app.state, "platform", None)
    if platform is None or getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "unavailable"}, status_code=503)
    checks: dict[str, Awaitable[Any]] = {
        "database": platform.db.ping(),
        "migrations": _migrations(platform),
        "broker": platform.broker.ping(),
        "pubsub": platform.pubsub.ping(),
    }
    if platform.redis is not None:
        checks["redis"] = platform.redis.ping()
    results = dict(zip(checks, await asyncio.gather(*map(_probe, checks.values())), strict=True))
    ok = all(v == "ok" for v in results.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": results},
        status_code=200 if ok else 503,
    )


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics() -> Response:
    return metrics_response()
