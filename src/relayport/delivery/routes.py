"""HTTP routes (thin: parse, authorize, call the service): /v1/endpoints, /v1/event-types,
/v1/messages and their attempts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime

from relayport.core.db import utcnow
from relayport.core.deps import (
    Admin,
    Operator,
    PlatformDep,
    ReadSessionDep,
    SessionDep,
    Viewer,
    after_commit,
    client_ip,
)
from relayport.core.paging import After, Limit
from relayport.core.schemas import ListResponse
from relayport.delivery import health, message_routes, messages, repository, service
from relayport.delivery.models import Attempt, Endpoint
from relayport.delivery.repository import AttemptRepository, EndpointRepository
from relayport.delivery.schemas import (
    AttemptOut,
    DeliverySettingsIn,
    DeliverySettingsOut,
    EndpointCreate,
    EndpointCreated,
    EndpointHealth,
    EndpointOut,
    EndpointSecret,
    EndpointUpdate,
    Requeued,
    SecretInfo,
    SecretRotate,
)
from relayport.delivery.secrets import secret_info

router = APIRouter(prefix="/v1")

Since = Annotated[AwareDatetime | None, Query(description="RFC 3339 with an offset.")]


# --- endpoints --------------------------------------------------------------------------------


def _endpoint(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "filter_types": endpoint.filter_types,
        "channels": endpoint.channels,
        "headers": endpoint.headers,
        "rate_limit_per_s": endpoint.rate_limit_per_s,
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "fallback_urls": endpoint.fallback_urls,
        "routing": endpoint.routing,
        "fifo": endpoint.fifo,
        "retry_schedule_s": endpoint.retry_schedule_s,
        "circuit_state": endpoint.circuit_state,
        "ed25519_public_key": endpoint.ed25519_public_key,
        "secrets": [SecretInfo(**s) for s in secret_info(endpoint, utcnow())],
        "created_at": endpoint.created_at,
        "updated_at": endpoint.updated_at,
    }


@router.post("/endpoints", status_code=201, response_model=EndpointCreated, tags=["endpoints"])
async def create_endpoint(
    body: EndpointCreate,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> EndpointCreated:
    """Create an endpoint; the URL is checked against the SSRF guard after DNS. Role: operator."""
    endpoint, secret = await service.create_endpoint(
        session,
        platform.keyring,
        platform.settings.delivery,
        principal,
        body.model_dump(),
        ip=client_ip(request),
    )
    return EndpointCreated(**_endpoint(endpoint), secret=secret)


@router.get("/endpoints", response_model=ListResponse[EndpointOut], tags=["endpoints"])
async def list_endpoints(
    principal: Viewer, session: ReadSessionDep, limit: Limit = 50, after: After = None
) -> ListResponse[EndpointOut]:
    """Endpoints of the tenant, newest first. Role: viewer."""
    page = await EndpointRepository(session, principal.tenant_id).page(limit=limit, after=after)
    return ListResponse(data=[EndpointOut(**_endpoint(e)) for e in page.items], next=page.next)


@router.get("/endpoints/{endpoint_id}", response_model=EndpointOut, tags=["endpoints"])
async def get_endpoint(endpoint_id: str, principal: Viewer, session: ReadSessionDep) -> EndpointOut:
    """One endpoint. Role: viewer."""
    endpoint = await EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    return EndpointOut(**_endpoint(endpoint))


@router.patch("/endpoints/{endpoint_id}", response_model=EndpointOut, tags=["endpoints"])
async def update_endpoint(
    endpoint_id: str,
    body: EndpointUpdate,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> EndpointOut:
    """Change an endpoint; `enabled: true` re-enables it and closes its circuit. Role: operator."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    endpoint = await service.update_endpoint(
        session, platform.settings.delivery, principal, endpoint_id, changes, ip=client_ip(request)
    )
    return EndpointOut(**_endpoint(endpoint))


@router.delete("/endpoints/{endpoint_id}", status_code=204, tags=["endpoints"])
async def delete_endpoint(
    endpoint_id: str, request: Request, principal: Operator, session: SessionDep
) -> Response:
    """Delete an endpoint with its deliveries and attempts. Role: operator."""
    await service.delete_endpoint(session, principal, endpoint_id, ip=client_ip(request))
    return Response(status_code=204)


@router.get("/endpoints/{endpoint_id}/secret", response_model=EndpointSecret, tags=["endpoints"])
async def get_secret(
    endpoint_id: str, principal: Operator, session: SessionDep, platform: PlatformDep
) -> EndpointSecret:
    """The endpoint's active signing secrets. Role: operator."""
    endpoint, values = await service.endpoint_secrets(
        session, platform.keyring, principal, endpoint_id
    )
    return EndpointSecret(
        key=values[0], secrets=values, ed25519_public_key=endpoint.ed25519_public_key
    )


@router.post(
    "/endpoints/{endpoint_id}/secret/rotate", response_model=EndpointSecret, tags=["endpoints"]
)
async def rotate_secret(
    endpoint_id: str,
    body: SecretRotate,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> EndpointSecret:
    """Add a secret; the current ones keep signing for `grace_period_s` (default 24 h), so
    receivers see both signatures meanwhile. Role: operator."""
    endpoint, _ = await service.rotate_secret(
        session,
        platform.keyring,
        platform.settings.delivery,
        principal,
        endpoint_id,
        secret=body.key,
        grace_period_s=body.grace_period_s,
        ip=client_ip(request),
    )
    _, values = await service.endpoint_secrets(session, platform.keyring, principal, endpoint.id)
    return EndpointSecret(
        key=values[0], secrets=values, ed25519_public_key=endpoint.ed25519_public_key
    )


@router.get(
    "/endpoints/{endpoint_id}/attempts", response_model=ListResponse[AttemptOut], tags=["endpoints"]
)
async def endpoint_attempts(
    endpoint_id: str,
    principal: Viewer,
    session: ReadSessionDep,
    succeeded: bool | None = None,
    since: Since = None,
    until: Since = None,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[AttemptOut]:
    """Attempts sent to an endpoint, newest first: also its health series. Role: viewer."""
    await EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    return await message_routes.attempts_page(
        session,
        principal.tenant_id,
        Attempt.endpoint_id == endpoint_id,
        succeeded=succeeded,
        since=since,
        until=until,
        limit=limit,
        after=after,
    )


HEALTH_WINDOW = 1000


@router.get("/endpoints/{endpoint_id}/health", response_model=EndpointHealth, tags=["endpoints"])
async def endpoint_health(
    endpoint_id: str, principal: Viewer, session: ReadSessionDep, since: Since = None
) -> EndpointHealth:
    """Success rate, latency percentiles and error classes of the endpoint's last 1,000
    attempts (since `since`), with its breaker state. Role: viewer."""
    endpoint = await EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    repo = AttemptRepository(session, principal.tenant_id)
    stmt = repo.query().where(Attempt.endpoint_id == endpoint.id)
    if since is not None:
        stmt = stmt.where(Attempt.created_at >= since)
    rows = (await session.execute(stmt.order_by(Attempt.id.desc()).limit(HEALTH_WINDOW))).scalars()
    attempts = list(rows)
    latencies = sorted(a.latency_ms for a in attempts)
    ok = sum(1 for a in attempts if a.succeeded)
    errors: dict[str, int] = {}
    for a in attempts:
        if not a.succeeded:
            errors[a.error_class or "other"] = errors.get(a.error_class or "other", 0) + 1

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return EndpointHealth(
        endpoint_id=endpoint.id,
        circuit_state=endpoint.circuit_state,
        enabled=endpoint.enabled,
        failing_since=endpoint.failing_since,
        attempts=len(attempts),
        succeeded=ok,
        success_rate=ok / len(attempts) if attempts else None,
        latency_p50_ms=pct(0.5),
        latency_p99_ms=pct(0.99),
        errors=errors,
    )


@router.post("/endpoints/{endpoint_id}/recover", response_model=Requeued, tags=["endpoints"])
async def recover(
    endpoint_id: str,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
    since: Since = None,
) -> Requeued:
    """Send again every dead delivery of the endpoint since `since`. Role: operator."""
    count = await messages.resend(
        session,
        principal,
        action="endpoint.recovered",
        statuses=("dead",),
        endpoint_id=endpoint_id,
        since=since,
        ip=client_ip(request),
    )
    after_commit(session, lambda: health.wake(platform))
    return Requeued(deliveries=count)


@router.post("/endpoints/{endpoint_id}/replay", response_model=Requeued, tags=["endpoints"])
async def replay(
    endpoint_id: str,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
    since: Since = None,
) -> Requeued:
    """Send again every finished delivery (succeeded or dead) since `since`. Role: operator."""
    count = await messages.resend(
        session,
        principal,
        action="endpoint.replayed",
        statuses=("succeeded", "dead"),
        endpoint_id=endpoint_id,
        since=since,
        ip=client_ip(request),
    )
    after_commit(session, lambda: health.wake(platform))
    return Requeued(deliveries=count)


@router.get("/delivery-settings", response_model=DeliverySettingsOut, tags=["endpoints"])
async def get_delivery_settings(
    principal: Viewer, session: ReadSessionDep, platform: PlatformDep
) -> DeliverySettingsOut:
    """The tenant's delivery defaults. Role: viewer."""
    own = await repository.tenant_settings(session, principal.tenant_id)
    schedule = own.retry_schedule_s if own is not None else None
    return DeliverySettingsOut(
        retry_schedule_s=schedule,
        effective_retry_schedule_s=schedule or platform.settings.delivery.retry_schedule_s,
    )


@router.put("/delivery-settings", response_model=DeliverySettingsOut, tags=["endpoints"])
async def put_delivery_settings(
    body: DeliverySettingsIn,
    request: Request,
    principal: Admin,
    session: SessionDep,
    platform: PlatformDep,
) -> DeliverySettingsOut:
    """Set the tenant's retry schedule (endpoints with their own keep theirs). Role: admin."""
    await service.set_tenant_schedule(
        session, principal, body.retry_schedule_s, ip=client_ip(request)
    )
    return DeliverySettingsOut(
        retry_schedule_s=body.retry_schedule_s,
        effective_retry_schedule_s=body.retry_schedule_s
        or platform.settings.delivery.retry_schedule_s,
    )


# The catalog and messages live in their own module; one router keeps app.py's mount as is.
router.routes.extend(message_routes.router.routes)
