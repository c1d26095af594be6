"""The outermost middleware: what every request needs, in one layer with one `send` wrapper.

For each HTTP and WebSocket request it assigns the request id (a sane incoming X-Request-ID,
else a fresh one), resolves the client address through the trusted proxies, and on the way out
adds the id, the security headers and whatever inner layers left in the scope (rate-limit
state), then records the HTTP metrics.

These were four pure-ASGI layers. A layer costs a call and a wrapped `send` per message, and
over HTTP the four cost ~28 µs per request more than this one (`bench/http_overhead.py`, the
ping case: 178 → 153 µs of server CPU with them removed). The policies stay where they were:
`security.middleware` (request ids, security headers), `security.client_ip` (addresses),
`telemetry.metrics` (the counters); this module only composes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from time import perf_counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relayport.core.context import request_id_var
from relayport.core.security.client_ip import IPNetwork, parse_networks, resolve_client
from relayport.core.security.middleware import (
    ID_MESSAGES,
    REQUEST_ID_HEADER,
    RESPONSE_HEADERS,
    SecurityHeaders,
    request_id_for,
    send_problem,
    with_headers,
)
from relayport.core.telemetry.metrics import CLIENT_CLOSED, record_request

_DEFAULT_HEADERS = SecurityHeaders()


def _has_nul(scope: Scope) -> bool:
    # No id, cursor or filter can hold NUL, and PostgreSQL refuses it in text (an error the
    # route would not expect): refused once here, for every route.
    return "\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")


class EdgeMiddleware:
    """Request id, client address, response headers and metrics for every request.

    `security_headers=None` sends no hardening headers (a deployment whose proxy adds its
    own).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        trusted_proxies: Iterable[str | IPNetwork] = (),
        security_headers: SecurityHeaders | None = _DEFAULT_HEADERS,
    ) -> None:
        self.app = app
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.security = security_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        resolve_client(scope, self.trusted_proxies)
        echoed = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        root_path: str = scope.get("root_path", "")
        security = self.security if kind == "http" else None
        status: int | None = None

        async def send_edge(message: Message) -> None:
            nonlocal status
            if message["type"] in ID_MESSAGES:
                status = message.get("status")
                # One pass over the response's headers for everything added here.
                html = False
                present = set()
                for name, value in message.get("headers", ()):
                    name = name.lower()
                    present.add(name)
                    if name == b"content-type" and value.startswith(b"text/html"):
                        html = True
                extra = [h for h in state.get(RESPONSE_HEADERS, ()) if h[0] not in present]
                if security is not None:
                    extra += security.missing(scope, present, html=html)
                if REQUEST_ID_HEADER not in present:
                    extra.append(echoed)
                message = with_headers(message, extra)
            await send(message)

        token = request_id_var.set(request_id)
        started = perf_counter()
        try:
            if kind == "http" and _has_nul(scope):
                await send_problem(
                    send_edge,
                    400,
                    "invalid-characters",
                    "Invalid characters",
                    "the URL holds a NUL character",
                )
            else:
                await self.app(scope, receive, send_edge)
        except asyncio.CancelledError:
            status = status or CLIENT_CLOSED
            raise
        except BaseException:
            # The server answers 500 for an app that raised before starting a response.
            status = status or 500
            raise
        finally:
            # Before the reset: the DEBUG request line carries the request id. (Spans have
            # ended by now, so it carries no trace id.)
            if kind == "http":
                record_request(scope, root_path, status or 500, perf_counter() - started)
            request_id_var.reset(token)
