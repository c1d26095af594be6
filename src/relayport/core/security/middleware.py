"""Request-level protection: request ids, security headers, body and concurrency limits.

Request ids and security headers are policies applied by `core.edge.EdgeMiddleware`, the one
outermost layer; the body and concurrency limits and CORS are pure-ASGI middleware of their
own. Pure ASGI rather than `BaseHTTPMiddleware`: that one runs the app in a separate task,
costs a copy of every message, and breaks streaming and contextvars. Each class here is
`X(app, ...)` with `async __call__(scope, receive, send)` and passes lifespan scopes through.
Responses produced here are problem+json like every other error (see `core.errors`).

Order, outermost first (`app.add_middleware` in the reverse order):
Edge (request id, client IP, security headers, metrics) → Tracing → ProblemCORS →
ConcurrencyLimit → RateLimit → BodyLimit → app. Ids and metrics wrap everything so refusals
are seen too; security and CORS headers go on refusals as well, so a browser can read a
413/429/503. Starlette's ServerErrorMiddleware always sits outside user middleware: an
unhandled exception's 500 bypasses these headers (the request id is in its body).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relayport.core.errors import PROBLEM_JSON, problem_bytes
from relayport.settings import HttpSettings

__all__ = [
    "API_CSP",
    "DOCS_CSP",
    "ID_MESSAGES",
    "PROBE_PATHS",
    "REQUEST_ID_HEADER",
    "RESPONSE_HEADERS",
    "BodyLimitMiddleware",
    "ConcurrencyLimitMiddleware",
    "InFlightGate",
    "ProblemCORSMiddleware",
    "SecurityHeaders",
    "cors_kwargs",
    "request_id_for",
    "route_path",
    "send_problem",
    "with_headers",
]

RawHeaders = list[tuple[bytes, bytes]]

# Raw headers inner layers ask the outermost one to add to the response.
RESPONSE_HEADERS = "response_headers"

# Probes and scrapes must answer while the process is saturated or draining, or the
# orchestrator would kill a busy-but-healthy instance.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def route_path(scope: Scope) -> str:
    """The path without the deployment's root_path (Starlette keeps it in `path`)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def with_headers(message: Message, extra: RawHeaders) -> Message:
    # A new dict, so a message an inner app keeps a reference to is not changed under it.
    return {**message, "headers": [*message.get("headers", ()), *extra]}


async def send_problem(
    send: Send,
    status: int,
    slug: str,
    title: str,
    detail: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with problem+json from middleware, before (or instead of) the app."""
    body = problem_bytes(status, slug, title, detail)
    raw: RawHeaders = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _close_connection(scope: Scope) -> RawHeaders:
    # HTTP/1.x only: in HTTP/2 connection-specific headers are malformed.
    if scope.get("http_version", "1.1") in ("1.0", "1.1"):
        return [(b"connection", b"close")]
    return []


# --- request ids ------------------------------------------------------------------------------

# Ids are echoed into headers and logs: anything outside this set could inject into either.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_HEADER = b"x-request-id"
# The messages that open a response: the request id goes on each.
ID_MESSAGES = frozenset(
    {"http.response.start", "websocket.accept", "websocket.http.response.start"}
)


def request_id_for(scope: Scope) -> str:
    """A sane incoming X-Request-ID, or 128 fresh random bits (as a uuid4, but cheaper)."""
    incoming = next(
        (v for k, v in scope.get("headers", ()) if k.lower() == REQUEST_ID_HEADER), None
    )
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return str(incoming.decode("ascii"))
    return os.urandom(16).hex()


# --- security headers -------------------------------------------------------------------------

API_CSP = "default-src 'none'; frame-ancestors 'none'"
# FastAPI's Swagger UI and ReDoc pages load their bundles from jsdelivr, run an inline bootstrap
# script, fetch /openapi.json, show a favicon from fastapi.tiangolo.com; ReDoc also pulls Google
# Fonts, a logo from cdn.redoc.ly and starts a blob: worker. Only these pages get this policy.
DOCS_CSP = (
    "default-src 'none'; "
    "script-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'; "
    "style-src 'self' https://cdn.jsdelivr.net https://fonts.googleapis.com 'unsafe-inline'; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "font-src https://fonts.gstatic.com; "
    "connect-src 'self'; "
    "worker-src blob:; "
    "base-uri 'none'; "
    "form-action 'self'; "
    "frame-ancestors 'none'"
)


class SecurityHeaders:
    """Browser hardening headers for every HTTP response; a header a route set is kept."""

    def __init__(
        self,
        *,
        csp: str = API_CSP,
        docs_csp: str = DOCS_CSP,
        docs_paths: Collection[str] = ("/docs", "/redoc"),
        hsts: str = "max-age=31536000",
        cache_control: str = "no-store",
    ) -> None:
        self.docs_paths = tuple(p.rstrip("/") for p in docs_paths)
        common: RawHeaders = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            # API answers hold tenant data: no shared or browser cache unless a route opts in.
            (b"cache-control", cache_control.encode()),
        ]
        # Referrer-Policy and COOP act only on documents a browser renders (the links and
        # windows a page opens); on JSON they do nothing, so only HTML responses carry them
        # (as OWASP's REST list leaves them out). Each header costs every response ~1 µs.
        document: RawHeaders = [
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        self._api = [*common, (b"content-security-policy", csp.encode())]
        self._api_page = [*self._api, *document]
        self._docs = [*common, *document, (b"content-security-policy", docs_csp.encode())]
        self._hsts = (b"strict-transport-security", hsts.encode())

    def _is_docs(self, scope: Scope) -> bool:
        path = route_path(scope)
        return any(path == p or path.startswith(p + "/") for p in self.docs_paths)

    def missing(self, scope: Scope, present: Collection[bytes], *, html: bool) -> RawHeaders:
        """The headers to add to a response that already has the names in `present`; `html`
        when it is a page (Content-Type text/html).

        Called when the response starts, not on entry: a trusted proxy's X-Forwarded-Proto
        may have changed the scheme since (HSTS only goes out over HTTPS).
        """
        page = self._api_page if html else self._api
        defaults = self._docs if self._is_docs(scope) else page
        extra = [(k, v) for k, v in defaults if k not in present]
        if scope.get("scheme") == "https" and self._hsts[0] not in present:
            extra.append(self._hsts)
        return extra


# --- body limit -------------------------------------------------------------------------------


class _BodyTooLarge(HTTPException):
    """Raised from `receive`. An HTTPException, so FastAPI's body parsing re-raises it as is
    instead of wrapping it into a 400, and no handler logs it as a server error."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


def _body_framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared Content-Length (None if absent) and whether Transfer-Encoding is set."""
    longest: int | None = None
    encoded = False
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"content-length" and value.strip().isdigit():
            # Servers reject conflicting lengths; if one slipped through, judge the largest.
            length = int(value)
            longest = length if longest is None else max(longest, length)
        elif name == b"transfer-encoding":
            encoded = True
    return longest, encoded


class BodyLimitMiddleware:
    """Answers 413 for bodies over the limit without ever reading more than the limit.

    A declared Content-Length over the limit is refused before the app runs. Otherwise
    `receive` counts bytes; the first chunk past the limit raises inside the app, whatever
    the app answers is dropped, and a 413 goes out instead if no response has started.
    `limit_for(scope)` may return a per-request limit (an ingest source with its own size);
    None keeps `max_bytes`.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        *,
        limit_for: Callable[[Scope], int | None] | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.app = app
        self.max_bytes = max_bytes
        self.limit_for = limit_for

    async def _reject(self, scope: Scope, send: Send, limit: int) -> None:
        # The unread rest of the body is still on the wire: close rather than reuse.
        await send_problem(
            send,
            413,
            "payload-too-large",
            "Payload too large",
            f"the request body exceeds {limit} bytes",
            _close_connection(scope),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared, encoded = _body_framing(scope) if scope["type"] == "http" else (None, True)
        if scope["type"] != "http" or (not declared and not encoded):
            # HTTP/1.1 frames every request body with one of the two headers: without them
            # (most GETs) there is nothing to count, so skip the receive/send wrappers.
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if self.limit_for is not None:
            override = self.limit_for(scope)
            if override is not None:
                limit = override
        if declared is not None and declared > limit:
            await self._reject(scope, send, limit)
            return

        received = 0
        tripped = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, tripped
            if tripped:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if tripped and not started:
                return  # the app's answer to the exception; the 413 below replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # After the trip any exception is the app failing on the cut-off body; anything
            # else, or a response already under way, is not ours to hide.
            if not tripped or started:
                raise
        if tripped and not started:
            await self._reject(scope, send, limit)


# --- concurrency limit and draining -----------------------------------------------------------


class InFlightGate:
    """Counts in-flight requests against a cap; knows whether the process is draining.

    A separate object because `app.add_middleware` builds the middleware lazily: the app
    factory keeps the gate (e.g. on `app.state`) to drain it from the lifespan or a signal.
    """

    def __init__(self, max_in_flight: int, retry_after_s: float = 1) -> None:
        if max_in_flight <= 0:
            raise ValueError("max_in_flight must be > 0")
        self.max_in_flight = max_in_flight
        # Retry-After takes whole seconds (RFC 9110 delay-seconds).
        self.retry_after_s = max(0, math.ceil(retry_after_s))
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def try_enter(self) -> bool:
        if self.draining or self.in_flight >= self.max_in_flight:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def start_draining(self) -> None:
        """New requests get 503 from now on; in-flight ones finish."""
        self.draining = True

    def stop_draining(self) -> None:
        self.draining = False

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """True once no request is in flight, False if `timeout_s` passes first.

        A timeout argument rather than `asyncio.timeout` around the call: the bool is what
        a drain logs ("n requests cut off"), and a timed-out drain is not an error.
        """
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class ConcurrencyLimitMiddleware:
    """503 + Retry-After beyond `max_in_flight` concurrent HTTP requests, or while draining.

    Probe paths are neither limited nor counted. WebSockets are not counted (they live for
    hours and would pin slots) but new ones are refused while draining.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int | None = None,
        retry_after_s: float = 1,
        *,
        gate: InFlightGate | None = None,
        exempt_paths: Collection[str] = PROBE_PATHS,
    ) -> None:
        if gate is None:
            if max_in_flight is None:
                raise TypeError("give max_in_flight or gate")
            gate = InFlightGate(max_in_flight, retry_after_s)
        self.app = app
        self.gate = gate
        self.exempt_paths = frozenset(exempt_paths)

    @property
    def draining(self) -> bool:
        return self.gate.draining

    def start_draining(self) -> None:
        self.gate.start_draining()

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        return await self.gate.wait_idle(timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket" and self.gate.draining:
            # 1012 "service restart": the client should reconnect, to another instance.
            await send({"type": "websocket.close", "code": 1012})
            return
        if kind != "http" or route_path(scope) in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        gate = self.gate
        if not gate.try_enter():
            retry = [(b"retry-after", str(gate.retry_after_s).encode())]
            if gate.draining:
                # Closing the connection moves the client's next attempt to another instance.
                await send_problem(
                    send,
                    503,
                    "unavailable",
                    "Service unavailable",
                    "the server is shutting down",
                    retry + _close_connection(scope),
                )
            else:
                await send_problem(
                    send,
                    503,
                    "overloaded",
                    "Server overloaded",
                    "too many requests in flight; retry later",
                    retry,
                )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave()


# --- CORS -------------------------------------------------------------------------------------


def cors_kwargs(http: HttpSettings, *, allow_credentials: bool = False) -> dict[str, Any] | None:
    """Arguments for (Problem)CORSMiddleware from settings; None when no origin is allowed.

    Origins are an allow-list: "*" is refused (with credentials browsers would reject it, and
    without them it opens every tenant's API to every site), as is anything but an origin.
    """
    origins: list[str] = []
    for origin in http.cors_origins:
        parts = urlsplit(origin)
        if (
            origin == "*"
            or parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ValueError(f"CORS origin must look like https://host[:port], not {origin!r}")
        origins.append(f"{parts.scheme}://{parts.netloc}")
    if not origins:
        return None
    return {
        "allow_origins": origins,
        "allow_credentials": allow_credentials,
        "allow_methods": ["GET", "POST", "PUT", "PATCH", "DELETE"],
        "allow_headers": [
            "Authorization",
            "Content-Type",
            "Idempotency-Key",
            "If-Match",
            "X-Request-ID",
        ],
        "expose_headers": [
            "X-Request-ID",
            "ETag",
            "Location",
            "Retry-After",
            "RateLimit-Limit",
            "RateLimit-Remaining",
        ],
        "max_age": 600,
    }


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with the rejected-preflight answer rendered as problem+json."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {
            k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")
        }
        detail = bytes(response.body).decode("utf-8", "replace")
        return Response(
            problem_bytes(
                response.status_code, "cors-rejected", "CORS request not allowed", detail
            ),
            status_code=response.status_code,
            headers=headers,
            media_type=PROBLEM_JSON,
        )
