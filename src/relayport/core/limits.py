"""The request budget: per-client-IP, per-principal and per-tenant token buckets and the
tenant's daily quota, checked as early and as rarely as possible.

`RateLimitMiddleware` runs before routing. When the request presents credentials the
authenticator already holds in its cache (the steady state of any busy client), it checks all
four limits in one atomic call (one Redis round trip when limits are shared) and leaves the
principal in the scope for the route's role check. Otherwise it spends only the IP bucket, so a
flood of unknown credentials is throttled before it can reach the database, and the route's
`require(role)` dependency authenticates and checks the principal's limits afterwards
(`check_principal`).

A request that presents valid credentials counts against its principal and tenant even on a
route that does not need them: the budget belongs to whoever sends the credentials.

A route whose own limits need one lookup first (ingest: the source named in the URL) can take
over the IP bucket with `route_spends_ip_limit(prefix)`, so that its request makes one limiter
call instead of two. For such a request without cached credentials the middleware spends
nothing and leaves the IP bucket in the scope (`owed_ip_limit`); the route must spend it, in the
same call as its own limits, before anything costly. A request with a declared method under
the prefix that no route takes (a 404) then spends no budget; it is answered without I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from relayport.core.auth.principal import Principal
from relayport.core.context import principal_id_var, tenant_id_var
from relayport.core.errors import RateLimited
from relayport.core.ratelimit import Decision, Limit
from relayport.core.security.middleware import (
    PROBE_PATHS,
    RESPONSE_HEADERS,
    route_path,
    send_problem,
)

if TYPE_CHECKING:
    from relayport.core.platform import Platform
    from relayport.settings import RateLimitSettings


# (method, path prefix) pairs whose route spends the IP bucket itself; see the module docstring.
_ROUTE_SPENT_IP: set[tuple[str, str]] = set()
_OWED_IP_LIMIT = "owed_ip_limit"


def route_spends_ip_limit(prefix: str, *, methods: tuple[str, ...] = ("POST",)) -> None:
    """Declare that the route under `prefix` spends the client IP's bucket in its own limiter
    call (through `owed_ip_limit`), before any database read or costly check."""
    for method in methods:
        _ROUTE_SPENT_IP.add((method, prefix))


def owed_ip_limit(scope: Scope) -> Limit | None:
    """The IP bucket the middleware left for this request's route to spend, once; None when the
    middleware spent it (or rate limits are off)."""
    limit = scope.get("state", {}).pop(_OWED_IP_LIMIT, None)
    return limit if isinstance(limit, Limit) else None


def _route_spends_ip(scope: Scope) -> bool:
    if not _ROUTE_SPENT_IP:
        return False
    method, path = scope["method"], route_path(scope)
    return any(m == method and path.startswith(p) for m, p in _ROUTE_SPENT_IP)


def principal_limits(settings: RateLimitSettings, principal: Principal) -> list[Limit]:
    """The principal's bucket, its tenant's bucket (by plan) and the tenant's daily quota."""
    plan = settings.plans.get(principal.plan) or settings.plans["free"]
    return [
        Limit.bucket(
            f"p:{principal.id}",
            rate=settings.principal_requests_per_second,
            burst=settings.principal_burst,
        ),
        Limit.bucket(f"t:{principal.tenant_id}", rate=plan.requests_per_second, burst=plan.burst),
        Limit.daily_quota(f"q:{principal.tenant_id}", limit=plan.daily_quota),
    ]


def _refusal(decisions: list[Decision], limits: list[Limit]) -> RateLimited | None:
    for decision, limit in zip(decisions, limits, strict=True):
        if not decision.allowed:
            quota = limit.kind == "quota"
            return RateLimited(
                "daily quota exhausted" if quota else "slow down",
                slug="quota-exceeded" if quota else "rate-limited",
                headers=decision.headers(),
            )
    return None


def bind_principal(state: dict[str, Any], principal: Principal) -> None:
    state["principal"] = principal
    tenant_id_var.set(principal.tenant_id)
    principal_id_var.set(principal.id)


async def check_principal(platform: Platform, principal: Principal, state: dict[str, Any]) -> None:
    """Spend the principal's limits (the IP bucket was spent before authentication); raise
    RateLimited if any refuses, else put the tightest one's headers on the response."""
    settings = platform.settings.ratelimit
    if not settings.enabled:
        return
    limits = principal_limits(settings, principal)
    decisions = await platform.limiter.check(limits)
    refused = _refusal(decisions, limits)
    if refused is not None:
        raise refused
    tightest = min(decisions, key=lambda d: d.remaining)
    state.setdefault(RESPONSE_HEADERS, []).extend(tightest.raw_headers())


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, *, platform: Callable[[], Platform | None]) -> None:
        self.app = app
        # The platform is built in the lifespan, after the middleware stack: look it up lazily.
        self.platform = platform
        # Principals are immutable (a role or plan change makes a new one), so their limits
        # can be built once; bounded like the authenticator's cache they come from.
        self._limits: dict[Principal, list[Limit]] = {}
        # The same for client addresses: a Limit validates itself when built (~3 µs).
        self._ip_limits: dict[tuple[str, float, int], Limit] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        platform = self.platform()
        if (
            scope["type"] != "http"
            or platform is None
            or not platform.settings.ratelimit.enabled
            or scope["path"] in PROBE_PATHS
        ):
            await self.app(scope, receive, send)
            return
        settings = platform.settings.ratelimit
        state = scope.setdefault("state", {})
        client = scope.get("client")
        ip = state.get("client_ip") or (client[0] if client else "unknown")
        rate, burst = settings.ip_requests_per_second, settings.ip_burst
        ip_limit = self._ip_limits.get((ip, rate, burst))
        if ip_limit is None:
            if len(self._ip_limits) >= 10_000:
                self._ip_limits.clear()
            ip_limit = self._ip_limits[(ip, rate, burst)] = Limit.bucket(
                f"ip:{ip}", rate=rate, burst=burst
            )
        limits = [ip_limit]
        principal = platform.authenticator.cached(_authorization(scope))
        if principal is not None:
            own = self._limits.get(principal)
            if own is None:
                if len(self._limits) >= 10_000:
                    self._limits.clear()
                own = self._limits[principal] = principal_limits(settings, principal)
            limits += own
        elif _route_spends_ip(scope):
            state[_OWED_IP_LIMIT] = limits[0]
            await self.app(scope, receive, send)
            return
        decisions = await platform.limiter.check(limits)
        refused = _refusal(decisions, limits)
        if refused is not None:
            headers = [(k.lower().encode(), v.encode()) for k, v in refused.headers.items()]
            await send_problem(
                send, refused.status, refused.slug, refused.title, refused.detail, headers
            )
            return
        if principal is not None:
            bind_principal(state, principal)
            tightest = min(decisions[1:], key=lambda d: d.remaining)
            state.setdefault(RESPONSE_HEADERS, []).extend(tightest.raw_headers())
        await self.app(scope, receive, send)


def _authorization(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None
