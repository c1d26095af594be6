"""FastAPI dependencies shared by every router: the platform, the request's session, the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.auth.principal import Principal
from relayport.core.context import principal_id_var, tenant_id_var
from relayport.core.errors import Problem, RateLimited
from relayport.core.platform import Platform
from relayport.core.ratelimit import Limit


def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


PlatformDep = Annotated[Platform, Depends(get_platform)]


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's one transaction: committed before the response is sent, or rolled back."""
    platform: Platform = request.app.state.platform
    async with platform.db.sessions() as session:
        try:
            yield session
        except Problem as exc:
            if exc.commit:
                await session.commit()
                _after_commit(session)
            else:
                await session.rollback()
            raise
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()
            _after_commit(session)


def after_commit(session: AsyncSession, callback: Callable[[], None]) -> None:
    """Run `callback` once the request's transaction has committed (e.g. drop a cache entry:
    doing it before the commit lets a concurrent request re-cache the old row)."""
    session.info.setdefault("after_commit", []).append(callback)


def _after_commit(session: AsyncSession) -> None:
    for callback in session.info.pop("after_commit", []):
        callback()


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]


def client_ip(request: Request) -> str | None:
    state = request.scope.get("state") or {}
    ip = state.get("client_ip")
    if ip:
        return str(ip)
    return request.client.host if request.client else None


async def _authenticate(request: Request, response: Response) -> Principal:
    platform: Platform = request.app.state.platform
    principal = await platform.authenticator.authenticate(request.headers.get("authorization"))
    tenant_id_var.set(principal.tenant_id)
    principal_id_var.set(principal.id)
    request.state.principal = principal
    await _limit(platform, principal, response)
    return principal


async def _limit(platform: Platform, principal: Principal, response: Response) -> None:
    """Per-principal and per-tenant token buckets, then the tenant's daily quota."""
    settings = platform.settings.ratelimit
    if not settings.enabled:
        return
    plan = settings.plans.get(principal.plan) or settings.plans["free"]
    # One atomic call (one Redis round trip): all three pass and are spent, or none is.
    decisions = await platform.limiter.check(
        [
            Limit.bucket(
                f"p:{principal.id}",
                rate=settings.principal_requests_per_second,
                burst=settings.principal_burst,
            ),
            Limit.bucket(
                f"t:{principal.tenant_id}", rate=plan.requests_per_second, burst=plan.burst
            ),
            Limit.daily_quota(f"q:{principal.tenant_id}", limit=plan.daily_quota),
        ]
    )
    for index, decision in enumerate(decisions):
        if not decision.allowed:
            quota = index == 2
            raise RateLimited(
                "daily quota exhausted" if quota else "slow down",
                slug="quota-exceeded" if quota else "rate-limited",
                headers=decision.headers(),
            )
    tightest = min(decisions, key=lambda d: d.remaining)
    response.headers.update(tightest.headers())


def require(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits principals with at least `role` in their tenant."""

    async def dependency(principal: Annotated[Principal, Depends(_authenticate)]) -> Principal:
        if not principal.has_role(role):
            raise Problem(
                f"this needs the {role} role",
                status=403,
                slug="insufficient-role",
                title="Insufficient role",
            )
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
