"""The long-lived push streams of `/v1/client/stream`: WebSocket and Server-Sent Events.

Both attach a subscriber to the hub, send the catch-up (missed deltas or a snapshot) and then,
when the server provides a wire (`wire.py`, always under `relayport serve`), let the hub write
every later event straight to the socket. An SSE stream's task then only waits for the end; a
WebSocket is handed over to a small `_Stream` object (acks and the end arrive as protocol
callbacks) and its task finishes (39 -> 23 KiB per idle subscriber). The
end is one of: the client went away, it fell behind (more than
`RELAYPORT_CONFIGS__SUBSCRIBER_BUFFER_BYTES` unread, or a full queue without a wire), its key
was revoked, or the server is draining. A stream that ends on the server's side tells the
client to reconnect (SSE `resync` event, WebSocket close 4000, or 1012 when draining); a reader
too stalled to take even that is aborted after `RELAYPORT_CONFIGS__SLOW_CLOSE_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, WebSocket
from fastapi.responses import Response
from sqlalchemy.exc import IntegrityError
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from relayport.configs.client_auth import ClientPrincipal, authenticate, spend
from relayport.configs.propagation import record_ack, set_connected
from relayport.configs.push import Channel, Hub, hub_of
from relayport.configs.subscribers import Event, Subscriber
from relayport.configs.wire import Wire, wire_of
from relayport.core import audit
from relayport.core.errors import Problem, RateLimited, Unauthorized, render
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
RESYNC = b'event: resync\ndata: {"reason":"reconnect"}\n\n'


def audit_secrets(
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


async def attach(
    platform: Platform,
    principal: ClientPrincipal,
    since: int | None,
    name: str | None = None,
) -> tuple[Hub, Channel, Subscriber, list[Event]]:
    hub = hub_of(platform)
    try:
        channel, subscriber, first = await hub.attach(
            principal.tenant_id,
            principal.environment_id,
            secrets=principal.secrets,
            since=since,
            key_id=principal.id,
            name=name,
        )
    except PubSubError:
        raise Problem("live push is unavailable", status=503, slug="unavailable") from None
    return hub, channel, subscriber, first


def track(
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


def _abort_if_stuck(wire: Wire) -> None:
    """After a close for falling behind: a reader that has not taken its bytes by now is not
    going to, so free the buffer rather than wait for TCP to give up."""
    if wire.buffered():
        wire.abort()


class EventStream(Response):
    """Server-Sent Events fed by a subscriber: the headers and the first bytes go through ASGI
    (and so through every middleware), later events through the wire when there is one."""

    media_type = "text/event-stream"

    def __init__(self, subscriber: Subscriber, first: bytes, on_end: Callable[[], None],
                 settings: Any) -> None:  # fmt: skip
        # Not Response.__init__: it would add `content-length: 0`.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.subscriber = subscriber
        self.first = first
        self.on_end = on_end
        self.buffer_limit: int = settings.subscriber_buffer_bytes
        self.close_timeout: float = settings.slow_close_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber = self.subscriber
        watcher: asyncio.Task[None] | None = None
        wire: Wire | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
            wire = wire_of(scope, "chunk")
            if wire is not None:
                wire.limit = self.buffer_limit
                subscriber.use_wire(wire, [])
            watcher = asyncio.get_running_loop().create_task(_until_disconnect(receive))
            watcher.add_done_callback(lambda _: subscriber.drop())
            secrets = subscriber.secrets
            while True:
                try:
                    events = await subscriber.next()
                except SubscriptionLost:
                    break
                body = b"".join(e.sse(secrets) for e in events)
                await send({"type": "http.response.body", "body": body, "more_body": True})
            if watcher.done():
                return  # the client left: nothing to finish
            try:
                async with asyncio.timeout(self.close_timeout):
                    await send({"type": "http.response.body", "body": RESYNC, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except TimeoutError:
                if wire is not None:
                    wire.abort()
        finally:
            if watcher is not None:
                watcher.cancel()
            self.on_end()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def sse(
    platform: Platform,
    principal: ClientPrincipal,
    since: int | None,
    name: str | None,
    ip: str | None,
    app: Any,
) -> Response:
    hub, channel, subscriber, first = await attach(platform, principal, since, name)
    hub.watch(app)
    if principal.secrets and channel.pointers:
        audit_secrets(platform, principal, channel.revision, ip)
    track(platform, principal, name, "sse", True)
    secrets = principal.secrets

    def end() -> None:
        hub.detach(channel, subscriber)
        track(platform, principal, name, "sse", False)

    # Comment line first: headers and the first bytes flush through proxies at once.
    head = b": connected\n\n" + b"".join(e.sse(secrets) for e in first)
    return EventStream(subscriber, head, end, platform.settings.configs)


@router.websocket("/client/stream")
async def client_websocket(
    websocket: WebSocket, since: Since = None, name: ClientName = None
) -> None:
    """WebSocket: server messages are the SSE events' JSON; the client sends
    `{"type": "ack", "revision": n}` after applying a revision."""
    platform: Platform = websocket.app.state.platform
    state = websocket.scope.get("state") or {}
    ip = state.get("client_ip") or (websocket.client.host if websocket.client else None)
    try:
        principal = await authenticate(platform, websocket.headers.get("authorization"))
        await spend(platform, principal, ip=ip or "unknown")
    except Unauthorized:
        await websocket.close(code=1008)
        return
    except RateLimited as exc:  # a real 429 (problem+json, Retry-After) instead of an upgrade
        await websocket.send_denial_response(render(exc))
        return
    try:
        hub, channel, subscriber, first = await attach(platform, principal, since, name)
    except Problem:
        await websocket.close(code=1011)
        return
    await websocket.accept()
    hub.watch(websocket.app)
    if principal.secrets and channel.pointers:
        audit_secrets(platform, principal, channel.revision, ip)
    track(platform, principal, name, "websocket", True)
    stream = _Stream(platform, principal, name, hub, channel, subscriber, websocket.app)
    wire = wire_of(websocket.scope, "ws")
    if wire is not None and wire.hand_over(stream):
        # From here the hub writes to the socket and `stream` takes acks and the end: this
        # task (and its coroutine chain through every middleware) ends, the connection stays.
        wire.limit = platform.settings.configs.subscriber_buffer_bytes
        stream.wire = wire
        subscriber.on_lost = stream.lost
        subscriber.use_wire(wire, first)
        return
    await _serve_over_asgi(websocket, stream, first)


class _Stream:
    """One WebSocket subscriber's state, shared by both ways of serving it."""

    __slots__ = ("app", "channel", "hub", "name", "platform", "principal", "subscriber", "wire")

    def __init__(self, platform: Platform, principal: ClientPrincipal, name: str | None, hub: Hub,
                 channel: Channel, subscriber: Subscriber, app: Any) -> None:  # fmt: skip
        self.platform = platform
        self.principal = principal
        self.name = name
        self.hub = hub
        self.channel = channel
        self.subscriber = subscriber
        self.app = app
        self.wire: Wire | None = None

    @property
    def close_code(self) -> int:
        # 1012: the server is restarting; 4000: reconnect (fell behind, or revoked).
        return 1012 if self.app.state.draining else 4000

    def on_text(self, text: str) -> None:
        revision = _ack_of(text)
        if revision is not None and self.name is not None:
            name = self.name
            self.hub.spawn(lambda: _record_ack(self.platform, self.principal, name, revision))

    def lost(self) -> None:
        """The subscriber was dropped (fell behind, revoked, draining): close the socket."""
        wire = self.wire
        if wire is None:
            return
        wire.close(self.close_code, "reconnect")
        if self.subscriber.slow:
            timeout = self.platform.settings.configs.slow_close_timeout_s
            asyncio.get_running_loop().call_later(timeout, _abort_if_stuck, wire)

    def on_closed(self) -> None:
        self.subscriber.drop()
        self.hub.detach(self.channel, self.subscriber)
        track(self.platform, self.principal, self.name, "websocket", False)


async def _serve_over_asgi(websocket: WebSocket, stream: _Stream, first: list[Event]) -> None:
    """The stream through ASGI sends, for servers without the wire extension."""
    subscriber = stream.subscriber
    reader = asyncio.get_running_loop().create_task(_acks(websocket, stream))
    # The client hung up: wake the writer at once rather than at the next heartbeat.
    reader.add_done_callback(lambda _: subscriber.drop())
    secrets = subscriber.secrets
    try:
        for event in first:
            await websocket.send_text(event.text(secrets))
        while not reader.done():
            try:
                events = await subscriber.next()
            except SubscriptionLost:
                if not reader.done():
                    await websocket.close(code=stream.close_code, reason="reconnect")
                return
            for event in events:
                await websocket.send_text(event.text(secrets))
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        stream.hub.detach(stream.channel, subscriber)
        track(stream.platform, stream.principal, stream.name, "websocket", False)


def _ack_of(text: str) -> int | None:
    try:
        message = orjson.loads(text)
        revision = int(message["revision"]) if message.get("type") == "ack" else None
    except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
        return None
    return revision if revision is not None and 1 <= revision < 2**31 else None


async def _acks(websocket: WebSocket, stream: _Stream) -> None:
    """Read client messages; acks are recorded when the client named itself."""
    while True:
        try:
            raw = await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            return
        revision = _ack_of(raw)
        if revision is not None and stream.name is not None:
            await _record_ack(stream.platform, stream.principal, stream.name, revision)


async def _record_ack(
    platform: Platform, principal: ClientPrincipal, name: str, revision: int
) -> None:
    """Record one ack, spending the key's rate limit (over it, the ack is skipped: the next
    one carries a later revision)."""
    try:
        await spend(platform, principal)
    except RateLimited:
        log.info("ack over the rate limit", extra={"event": "configs.ack_limited"})
        return
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
            return
        except Problem:
            return
        except IntegrityError:
            if attempt:
                log.warning("ack not recorded", extra={"event": "configs.ack_failed"})
