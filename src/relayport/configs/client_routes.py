"""The client API, authenticated by client keys: /v1/client/config, /v1/client/stream, acks.

`/v1/client/stream` speaks three transports: WebSocket, Server-Sent Events (`Accept:
text/event-stream`) and long-poll (any other GET, `?since=&wait=`). Each starts from the
client's revision (`since`, or SSE `Last-Event-ID`) and sends the missed deltas or a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response, WebSocket
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError
from starlette.websockets import WebSocketDisconnect

from relayport.configs import documents as docs
from relayport.configs.client_auth import ClientPrincipal, authenticate
from relayport.configs.propagation import record_ack, set_connected
from relayport.configs.push import Channel, Hub, hub_of
from relayport.configs.repository import EnvironmentRepository
from relayport.configs.schemas import AckIn
from relayport.configs.subscribers import Event, Subscriber
from relayport.configs.versions import state_of
from relayport.core import audit
from relayport.core.deps import PlatformDep, SessionDep, client_ip
from relayport.core.errors import NotFound, Problem, Unauthorized
from relayport.core.platform import Platform
from relayport.core.pubsub import PubSubError, SubscriptionLost

log = logging.getLogger("relayport.configs")
router = APIRouter(prefix="/v1")
Since = Annotated[int | None, Query(ge=0, le=2**31 - 1, description="The client's revision.")]
ClientName = Annotated[
    str | None,
    Query(
        alias="client",
        pattern=r"^[A-Za-z0-9][\w.:-]{0,99}$",
        description="This client instance's name: tracked for acknowledgements.",
    ),
]
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing, unknown or revoked client key."},
    503: {"description": "Live push is unavailable (pub/sub down)."},
}


def _audit_secrets(
    platform: Platform, principal: ClientPrincipal, revision: int, ip: str | None
) -> None:
    async def run() -> None:
        async with platform.db.transaction() as session:
            audit.record_by(
                session,
                principal,
                "config.secrets_read",
                ip=ip,
                target_type="environment",
                target_id=principal.environment_id,
                details={"revision": revision},
            )

    hub_of(platform).spawn(run)


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


@router.post("/client/acks", status_code=204, tags=["client"], responses=_PROBLEMS)
async def client_ack(
    body: AckIn, request: Request, session: SessionDep, platform: PlatformDep
) -> Response:
    """Record that the client named `client` applied `revision`."""
    principal = await authenticate(platform, request.headers.get("authorization"))
    await record_ack(
        session,
        principal.tenant_id,
        principal.environment_id,
        principal.id,
        body.client,
        body.revision,
    )
    return Response(status_code=204)


async def _attach(
    platform: Platform, principal: ClientPrincipal, since: int | None
) -> tuple[Hub, Channel, Subscriber, list[Event]]:
    hub = hub_of(platform)
    try:
        channel, subscriber, first = await hub.attach(
            principal.tenant_id,
            principal.environment_id,
            secrets=principal.secrets,
            since=since,
            key_id=principal.id,
        )
    except PubSubError:
        raise Problem("live push is unavailable", status=503, slug="unavailable") from None
    return hub, channel, subscriber, first


def _track(
    platform: Platform, principal: ClientPrincipal, name: str | None, transport: str, on: bool
) -> None:
    if name is None:
        return
    hub_of(platform).spawn(
        lambda: set_connected(
            platform.db,
            principal.tenant_id,
            principal.environment_id,
            principal.id,
            name,
            connected=on,
            transport=transport,
        )
    )


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
    if last_event_id is not None and last_event_id.isdigit():
        since = int(last_event_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        return await _sse(request, platform, principal, since, name)
    settings = platform.settings.configs
    timeout = min(
        wait if wait is not None else settings.long_poll_max_wait_s, settings.long_poll_max_wait_s
    )
    hub, channel, subscriber, events = await _attach(platform, principal, since)
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
        _audit_secrets(platform, principal, events[-1].revision, client_ip(request))
    body = b'{"events":[' + b",".join(e.json(principal.secrets) for e in events) + b"]}"
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


async def _sse(
    request: Request,
    platform: Platform,
    principal: ClientPrincipal,
    since: int | None,
    name: str | None,
) -> Response:
    hub, channel, subscriber, first = await _attach(platform, principal, since)
    hub.watch(request.app)
    if principal.secrets and channel.pointers:
        _audit_secrets(platform, principal, channel.revision, client_ip(request))
    _track(platform, principal, name, "sse", True)
    secrets = principal.secrets

    async def frames() -> AsyncIterator[bytes]:
        try:
            # Comment line first: headers and the first bytes flush through proxies at once.
            yield b": connected\n\n" + b"".join(e.sse(secrets) for e in first)
            while True:
                try:
                    events = await subscriber.next()
                except SubscriptionLost:
                    yield b'event: resync\ndata: {"reason":"reconnect"}\n\n'
                    return
                yield b"".join(e.sse(secrets) for e in events)
        finally:
            hub.detach(channel, subscriber)
            _track(platform, principal, name, "sse", False)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.websocket("/client/stream")
async def client_websocket(
    websocket: WebSocket, since: Since = None, name: ClientName = None
) -> None:
    """WebSocket: server messages are the SSE events' JSON; the client sends
    `{"type": "ack", "revision": n}` after applying a revision."""
    platform: Platform = websocket.app.state.platform
    try:
        principal = await authenticate(platform, websocket.headers.get("authorization"))
    except Unauthorized:
        await websocket.close(code=1008)
        return
    try:
        hub, channel, subscriber, first = await _attach(platform, principal, since)
    except Problem:
        await websocket.close(code=1011)
        return
    await websocket.accept()
    hub.watch(websocket.app)
    if principal.secrets and channel.pointers:
        ip = websocket.client.host if websocket.client else None
        _audit_secrets(platform, principal, channel.revision, ip)
    _track(platform, principal, name, "websocket", True)
    reader = asyncio.get_running_loop().create_task(_acks(websocket, platform, principal, name))
    # The client hung up: wake the writer at once rather than at the next heartbeat.
    reader.add_done_callback(lambda _: subscriber.drop())
    secrets = principal.secrets
    try:
        for event in first:
            await websocket.send_text(event.text(secrets))
        while not reader.done():
            try:
                events = await subscriber.next()
            except SubscriptionLost:
                if reader.done():
                    return
                # 1012: the server is restarting; 4000: this client fell behind. Both: reconnect.
                code = 1012 if websocket.app.state.draining else 4000
                await websocket.close(code=code, reason="reconnect")
                return
            for event in events:
                await websocket.send_text(event.text(secrets))
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        hub.detach(channel, subscriber)
        _track(platform, principal, name, "websocket", False)


async def _acks(
    websocket: WebSocket, platform: Platform, principal: ClientPrincipal, name: str | None
) -> None:
    """Read client messages; acks are recorded when the client named itself."""
    while True:
        try:
            raw = await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            return
        try:
            message = orjson.loads(raw)
            revision = int(message["revision"]) if message.get("type") == "ack" else None
        except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
            continue
        if revision is None or name is None or not 1 <= revision < 2**31:
            continue
        for attempt in range(2):  # the first ack may race the connect's insert of the client
            try:
                async with platform.db.transaction() as session:
                    await record_ack(
                        session,
                        principal.tenant_id,
                        principal.environment_id,
                        principal.id,
                        name,
                        revision,
                    )
                break
            except Problem:
                break
            except IntegrityError:
                if attempt:
                    log.warning("ack not recorded", extra={"event": "configs.ack_failed"})
