"""Per-client-IP token bucket, in front of authentication so floods never reach the database."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from relayport.core.errors import problem_bytes
from relayport.core.ratelimit import RateLimiter

EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})


class IpRateLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: Callable[[], RateLimiter | None],
        rate: float,
        burst: int,
    ) -> None:
        self.app = app
        # The limiter is built in the lifespan, after the middleware stack: look it up lazily.
        self.limiter = limiter
        self.rate = rate
        self.burst = burst

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = self.limiter()
        if scope["type"] != "http" or limiter is None or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        state = scope.get("state") or {}
        client = scope.get("client")
        ip = state.get("client_ip") or (client[0] if client else "unknown")
        decision = await limiter.hit(f"ip:{ip}", rate=self.rate, burst=self.burst)
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        body = problem_bytes(429, "rate-limited", "Too many requests", "slow down")
        headers = [(b"content-type", b"application/problem+json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in decision.headers().items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
