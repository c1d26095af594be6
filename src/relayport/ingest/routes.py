"""HTTP surface of inbound webhooks: /v1/ingest (public), /v1/sources, /v1/events, /v1/jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from relayport.core.asgi_route import send_json, served_by
from relayport.core.deps import Operator, PlatformDep, ReadSessionDep, SessionDep, Viewer, client_ip
from relayport.core.limits import owed_ip_limit, route_spends_ip_limit
from relayport.core.paging import After, Limit
from relayport.core.platform import Platform
from relayport.core.schemas import ListResponse
from relayport.core.security.middleware import route_path
from relayport.ingest import intake, service
from relayport.ingest.models import InboxEvent, Job, Rejection, Source
from relayport.ingest.repository import JobRepository, RejectionRepository, SourceRepository
from relayport.ingest.schemas import (
    MAX_BODY_LIMIT,
    EventDetail,
    EventOut,
    HmacConfigOut,
    IngestResult,
    JobOut,
    JobStatus,
    RejectionOut,
    ReplayResult,
    SecretRotate,
    SourceCreate,
    SourceCreated,
    SourceOut,
    SourceRotated,
    SourceUpdate,
)
from relayport.ingest.secrets import secret_info
from relayport.ingest.sources_cache import source_cache

router = APIRouter(prefix="/v1")

IdFilter = Annotated[str | None, Query(max_length=64)]
Since = Annotated[AwareDatetime | None, Query(description="RFC 3339 with an offset.")]

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Signature missing, malformed, wrong or stale (`reason` says which)."},
    403: {"description": "The source is disabled."},
    404: {"description": "No such source."},
    413: {"description": "Body over the source's limit."},
    415: {"description": "The scheme needs a JSON body."},
    429: {"description": "Source or tenant rate limit, or daily quota."},
}


# --- ingestion --------------------------------------------------------------------------------


def body_limit_for(scope: Scope) -> int | None:
    """The body-limit middleware's cap for ingest paths: the largest any source may have.

    Each source's own limit is enforced by the route while it reads (after a Content-Length
    check), where the refusal is counted for that source.
    """
    return MAX_BODY_LIMIT if route_path(scope).startswith("/v1/ingest/") else None


def _raw_headers(scope: Scope) -> dict[str, str]:
    # ASGI names are lower-case already; reversed so that the first of repeated headers wins,
    # as `request.headers[...]` would pick.
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives (what `Request.stream()` does, without the Request)."""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def _ingest(scope: Scope, receive: Receive) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """One delivery: its status code, JSON body and extra (RateLimit) headers. Problems are
    raised, and rendered as problem+json by the app's handlers like any route's."""
    platform: Platform = scope["app"].state.platform
    source, limit_headers = await intake.find_and_admit(
        platform, scope["path_params"]["source_id"], owed_ip_limit(scope)
    )
    headers = _raw_headers(scope)
    length = headers.get("content-length", "")
    declared = int(length) if length.isdigit() else None
    body = await intake.read_body(source, _chunks(receive), declared)
    outcome = await intake.accept(platform, source, headers, body)
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in limit_headers.items()]
    return outcome.status_code, orjson.dumps(outcome.body()), extra


async def _serve_ingest(scope: Scope, receive: Receive, send: Send) -> None:
    status, payload, extra = await _ingest(scope, receive)
    await send_json(send, status, payload, extra)


async def ingest(source_id: str, request: Request) -> Response:
    """Public: the provider's signature is the credential. 202 once the event is durably in
    the inbox with its job; 200 `{"status": "duplicate"}` for a delivery already received."""
    # Served by `_serve_ingest`, a plain ASGI function (core.asgi_route): this is the hottest
    # public path, and FastAPI's request handling cost more CPU per delivery than verifying
    # and storing it. This function gives the route its OpenAPI description and serves it only
    # where FastAPI wraps the route itself (an included router).
    status, payload, extra = await _ingest(request.scope, request.receive)
    response = Response(payload, status_code=status, media_type="application/json")
    response.raw_headers.extend(extra)
    return response


router.add_api_route(
    "/ingest/{source_id}",
    ingest,
    methods=["POST"],
    status_code=202,
    response_model=IngestResult,
    tags=["ingest"],
    summary="Receive a webhook",
    responses={
        200: {
            "description": 'A duplicate (`{"status": "duplicate", "event_id"}`), or the '
            'answer to Slack\'s URL verification (`{"challenge": …}`, nothing stored).',
        },
        503: {"description": "The delivery could not be stored; send it again."},
        **_PROBLEMS,
    },
    route_class_override=served_by(_serve_ingest),
)
# The route spends the client IP's bucket together with the source's limits (one limiter call
# per delivery), before the body is read or the signature checked.
route_spends_ip_limit("/v1/ingest/")


# --- sources ----------------------------------------------------------------------------------


def _source_fields(source: Source) -> dict[str, Any]:
    hmac = None
    if source.hmac_header:
        hmac = HmacConfigOut(
            header=source.hmac_header,
            algorithm=source.hmac_algorithm or "sha256",
            encoding=source.hmac_encoding or "hex",
            prefix=source.hmac_prefix or "",
            timestamp_header=source.hmac_timestamp_header,
        )
    return {
        "id": source.id,
        "name": source.name,
        "scheme": source.scheme,
        "ingest_url": f"/v1/ingest/{source.id}",
        "tolerance_s": source.tolerance_s,
        "body_limit_bytes": source.body_limit_bytes,
        "hmac": hmac,
        "type_pointer": source.type_pointer,
        "handler": source.handler,
        "max_attempts": source.max_attempts,
        "enabled": source.enabled,
        "created_at": source.created_at,
        "updated_at": source.updated_at,
    }


def _source(source: Source) -> SourceOut:
    return SourceOut(**_source_fields(source), secrets=secret_info(source))


@router.post("/sources", status_code=201, response_model=SourceCreated, tags=["sources"])
async def create_source(
    body: SourceCreate,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> SourceCreated:
    """Create a source. Its secrets are in this response only. Role: operator."""
    source, secrets = await service.create_source(
        session,
        platform.keyring,
        principal,
        name=body.name,
        scheme=body.scheme,
        secrets=body.secrets,
        tolerance_s=body.tolerance_s,
        body_limit_bytes=body.body_limit_bytes,
        hmac=body.hmac,
        type_pointer=body.type_pointer,
        handler=body.handler,
        max_attempts=body.max_attempts or platform.settings.ingest.max_attempts,
        enabled=body.enabled,
        ip=client_ip(request),
    )
    return SourceCreated.model_validate(
        {
            **_source_fields(source),
            "secrets": [
                {"value": s.value, "created_at": s.created_at, "expires_at": s.expires_at}
                for s in secrets
            ],
        }
    )


@router.get("/sources", response_model=ListResponse[SourceOut], tags=["sources"])
async def list_sources(
    principal: Viewer, session: ReadSessionDep, limit: Limit = 50, after: After = None
) -> ListResponse[SourceOut]:
    """Sources of the tenant, newest first (never their secrets). Role: viewer."""
    page = await SourceRepository(session, principal.tenant_id).page(limit=limit, after=after)
    return ListResponse(data=[_source(s) for s in page.items], next=page.next)


@router.get("/sources/{source_id}", response_model=SourceOut, tags=["sources"])
async def get_source(source_id: str, principal: Viewer, session: ReadSessionDep) -> SourceOut:
    """One source. Role: viewer."""
    return _source(await SourceRepository(session, principal.tenant_id).get(source_id))


@router.patch("/sources/{source_id}", response_model=SourceOut, tags=["sources"])
async def update_source(
    source_id: str,
    body: SourceUpdate,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> SourceOut:
    """Change a source's settings (not its scheme). Role: operator."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    source = await service.update_source(
        session, principal, source_id, changes, ip=client_ip(request)
    )
    source_cache(platform).forget(source.id)
    return _source(source)


@router.delete("/sources/{source_id}", status_code=204, tags=["sources"])
async def delete_source(
    source_id: str,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> Response:
    """Delete a source with its events, jobs and rejections. Role: operator."""
    await service.delete_source(session, principal, source_id, ip=client_ip(request))
    source_cache(platform).forget(source_id)
    return Response(status_code=204)


@router.post("/sources/{source_id}/secrets/rotate", response_model=SourceRotated, tags=["sources"])
async def rotate_secret(
    source_id: str,
    body: SecretRotate,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> SourceRotated:
    """Add a secret (generated unless given; shown in this response only). The current ones
    keep verifying for `grace_period_s`. Role: operator."""
    source, secret = await service.rotate_secret(
        session,
        platform.keyring,
        principal,
        source_id,
        secret=body.secret,
        grace_period_s=body.grace_period_s,
        ip=client_ip(request),
    )
    source_cache(platform).forget(source.id)
    return SourceRotated(**_source_fields(source), secrets=secret_info(source), secret=secret)


@router.get(
    "/sources/{source_id}/rejections",
    response_model=ListResponse[RejectionOut],
    tags=["sources"],
)
async def list_rejections(
    source_id: str,
    principal: Operator,
    session: SessionDep,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[RejectionOut]:
    """Recently refused deliveries (the last 100, at most 7 days old), newest first, with
    their reason, selected headers and the first 1 KiB of the body. Role: operator."""
    await SourceRepository(session, principal.tenant_id).get(source_id)
    repo = RejectionRepository(session, principal.tenant_id)
    stmt = repo.query().where(
        Rejection.source_id == source_id,
        Rejection.received_at >= intake.rejections_cutoff(),
    )
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(data=[_rejection(r) for r in page.items], next=page.next)


def _rejection(row: Rejection) -> RejectionOut:
    return RejectionOut(
        id=row.id,
        source_id=row.source_id,
        reason=row.reason,
        received_at=row.received_at,
        headers=row.headers,
        body_prefix=row.body_prefix.decode("utf-8", "replace"),
        body_size=row.body_size,
    )


@router.post("/sources/{source_id}/replay", response_model=ReplayResult, tags=["sources"])
async def replay_source(
    source_id: str,
    request: Request,
    principal: Operator,
    session: SessionDep,
    since: Since = None,
) -> ReplayResult:
    """Run the source's handler again for its inbox events received since `since` (every event
    when omitted). Jobs still in progress are left alone. Role: operator."""
    count = await service.replay_source(
        session, principal, source_id, since=since, ip=client_ip(request)
    )
    return ReplayResult(replayed=count)


# --- events and jobs --------------------------------------------------------------------------


def _event_fields(event: InboxEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "source_id": event.source_id,
        "type": event.type,
        "subject": event.subject,
        "dedup_key": event.dedup_key,
        "sha256": event.sha256,
        "size": event.size,
        "headers": event.headers,
        "received_at": event.received_at,
        "duplicate_count": event.duplicate_count,
    }


@router.get("/events", response_model=ListResponse[EventOut], tags=["events"])
async def list_events(
    principal: Viewer,
    session: ReadSessionDep,
    source_id: IdFilter = None,
    type: Annotated[str | None, Query(max_length=200)] = None,
    since: Since = None,
    until: Since = None,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[EventOut]:
    """The inbox, newest first; filter by source, type and received time [since, until).
    Role: viewer."""
    repo, stmt = service.events_query(
        session, principal.tenant_id, source_id=source_id, type=type, since=since, until=until
    )
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(data=[EventOut(**_event_fields(e)) for e in page.items], next=page.next)


@router.get("/events/{event_id}", response_model=EventDetail, tags=["events"])
async def get_event(event_id: str, principal: Viewer, session: ReadSessionDep) -> EventDetail:
    """One inbox event with its CloudEvents envelope and its body. Role: viewer."""
    repo, _ = service.events_query(
        session, principal.tenant_id, source_id=None, type=None, since=None, until=None
    )
    event = await repo.get(event_id)
    return EventDetail(
        **_event_fields(event),
        cloudevent=service.cloudevent(event),
        body=service.readable_body(event.body),
    )


def _job(job: Job) -> JobOut:
    return JobOut.model_validate(job, from_attributes=True)


@router.get("/jobs", response_model=ListResponse[JobOut], tags=["jobs"])
async def list_jobs(
    principal: Viewer,
    session: ReadSessionDep,
    status: JobStatus | None = None,
    source_id: IdFilter = None,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[JobOut]:
    """Jobs, newest first; `?status=dead` lists the dead letters. Role: viewer."""
    repo = JobRepository(session, principal.tenant_id)
    stmt = repo.query()
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if source_id is not None:
        stmt = stmt.where(Job.source_id == source_id)
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(data=[_job(j) for j in page.items], next=page.next)


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
async def get_job(job_id: str, principal: Viewer, session: ReadSessionDep) -> JobOut:
    """One job. Role: viewer."""
    return _job(await JobRepository(session, principal.tenant_id).get(job_id))


@router.post("/jobs/{job_id}/retry", response_model=JobOut, tags=["jobs"])
async def retry_job(
    job_id: str, request: Request, principal: Operator, session: SessionDep
) -> JobOut:
    """Queue a dead (or succeeded) job again with a fresh attempt budget; 409 while it is still
    queued, running or retrying. Role: operator."""
    return _job(await service.retry_job(session, principal, job_id, ip=client_ip(request)))
