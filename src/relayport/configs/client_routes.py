"""The client API, authenticated by client keys: /v1/client/config, /v1/client/stream, acks.

`/v1/client/stream` speaks three transports: WebSocket, Server-Sent Events (`Accept:
text/event-stream`) and long-poll (any other GET, `?since=&wait=`). Each starts from the
client's revision (`since`, or SSE `Last-Event-ID`) and sends the missed deltas or a snapshot.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Response

from relayport.configs import documents as docs
from relayport.configs.client_auth import ClientPrincipal, authenticate, spend
from relayport.configs.propagation import record_ack
from relayport.configs.repository import EnvironmentRepository
from relayport.configs.schemas import AckIn
from relayport.configs.streams import ClientName, Since, attach, audit_secrets, sse
from relayport.configs.versions import state_of
from relayport.core import audit
from relayport.core.deps import PlatformDep, SessionDep, client_ip
from relayport.core.errors import NotFound
from relayport.core.pubsub import SubscriptionLost

router = APIRouter(prefix="/v1")
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing, unknown or revoked client key."},
    429: {"description": "The client key (or the caller's IP) is over its rate limit."},
    503: {"description": "Live push is unavailable (pub/sub down)."},
}


@router.get("/client/config", tags=["client"], responses=_PROBLEMS)
async def client_config(
    request: Request,
    session: SessionDep,
    platform: PlatformDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=200)] = None,
) -> Response:
    """The environment's configuration for this client key; 304 when `If-None-Match` names
    the current revision. Secret values only for keys created with `secrets: true` (audited)."""
    principal = await authenticate(platform, request.headers.get("authorization"))
    await spend(platform, principal)
    env = await EnvironmentRepository(session, principal.tenant_id).find(principal.environment_id)
    if env is None:
        raise NotFound("no such environment")
    etag = f'"{env.revision}-{env.head_hash[:16]}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    state = await state_of(
        session,
        platform.keyring,
        principal.tenant_id,
        env.id,
        env.revision,
        with_secrets=principal.secrets,
    )
    body: dict[str, Any] = {
        "revision": state.revision,
        "hash": state.hash,
        "config": state.full() if principal.secrets else state.stored,
    }
    if principal.secrets:
        body["commitments"] = docs.commitments_of(state.stored)
        if state.pointers:
            audit.record_by(
                session,
                principal,
                "config.secrets_read",
                ip=client_ip(request),
                target_type="environment",
                target_id=env.id,
                details={"revision": env.revision},
            )
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


async def _acking_client(request: Request, platform: PlatformDep) -> ClientPrincipal:
    # A dependency, so the key is checked before the body is validated: without a valid key
    # the answer is 401, never a 422 that describes the body it expects.
    principal = await authenticate(platform, request.headers.get("authorization"))
    await spend(platform, principal)
    return principal


@router.post("/client/acks", status_code=204, tags=["client"], responses=_PROBLEMS)
async def client_ack(
    principal: Annotated[ClientPrincipal, Depends(_acking_client)],
    body: AckIn,
    session: SessionDep,
) -> Response:
    """Record that the client named `client` applied `revision`."""
    await record_ack(
        session,
        principal.tenant_id,
        principal.environment_id,
        principal.id,
        body.client,
        body.revision,
    )
    return Response(status_code=204)


@router.get("/client/stream", tags=["client"], responses=_PROBLEMS)
async def client_stream(
    request: Request,
    platform: PlatformDep,
    since: Since = None,
    wait: Annotated[float | None, Query(gt=0, le=300)] = None,
    name: ClientName = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> Response:
    """Server-Sent Events with `Accept: text/event-stream` (event `id:` is the revision, so
    `Last-Event-ID` resumes), else long-poll: the events after `since`, or 304 after `wait`
    seconds without one."""
    principal = await authenticate(platform, request.headers.get("authorization"))
    await spend(platform, principal)
    if last_event_id is not None and last_event_id.isdigit():
        since = int(last_event_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        return await sse(platform, principal, since, name, client_ip(request), request.app)
    settings = platform.settings.configs
    timeout = min(
        wait if wait is not None else settings.long_poll_max_wait_s, settings.long_poll_max_wait_s
    )
    hub, channel, subscriber, events = await attach(platform, principal, since)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not events:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    events = [e for e in await subscriber.next() if e.kind != "heartbeat"]
            except TimeoutError:
                break
            except SubscriptionLost:  # fell behind while waiting: answer with the current state
                events = [channel.snapshot()]
    finally:
        hub.detach(channel, subscriber)
    if not events:
        return Response(status_code=304, headers={"Cache-Control": "no-cache"})
    if principal.secrets and channel.pointers:
        audit_secrets(platform, principal, events[-1].revision, client_ip(request))
    body = b'{"events":[' + b",".join(e.json(principal.secrets) for e in events) + b"]}"
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})
