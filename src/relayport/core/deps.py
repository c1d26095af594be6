"""FastAPI dependencies shared by every router: the platform, the request's session, the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.auth.principal import Principal
from relayport.core.errors import Problem
from relayport.core.limits import bind_principal, check_principal
from relayport.core.platform import Platform


def platform_of(request: Request) -> Platform:
    """The platform, for the hottest routes: they take `request: Request` (which FastAPI
    passes directly) instead of `PlatformDep`, as FastAPI solves every dependency on every
    request (~12 µs each, measured)."""
    platform: Platform = request.app.state.platform
    return platform


async def get_platform(request: Request) -> Platform:
    # async although it awaits nothing: FastAPI runs a plain `def` dependency in a worker
    # thread, a thread hand-off on every request that asks for the platform.
    return platform_of(request)


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


async def _read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session for a request that only reads: no transaction, nothing to commit."""
    platform: Platform = request.app.state.platform
    async with platform.db.reads() as session:
        yield session


def after_commit(session: AsyncSession, callback: Callable[[], None]) -> None:
    """Run `callback` once the request's transaction has committed (e.g. drop a cache entry:
    doing it before the commit lets a concurrent request re-cache the old row)."""
    session.info.setdefault("after_commit", []).append(callback)


def _after_commit(session: AsyncSession) -> None:
    for callback in session.info.pop("after_commit", []):
        callback()


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]
# For GET routes: every statement autocommits, so it must only read (a write through it would
# not be one transaction with the request's other writes).
ReadSessionDep = Annotated[AsyncSession, Depends(_read_session, scope="function")]


def client_ip(request: Request) -> str | None:
    state = request.scope.get("state") or {}
    ip = state.get("client_ip")
    if ip:
        return str(ip)
    return request.client.host if request.client else None


async def authorize(request: Request, role: str) -> Principal:
    """The request's principal if it has at least `role` in its tenant; 401/403 otherwise.

    RateLimitMiddleware has usually resolved (and rate-limited) the principal from the
    authenticator's cache already; otherwise authenticate now and spend its limits. Routes
    declare their role with `Viewer`/`Operator`/`Admin`; the few hottest call this directly
    (with `request: Request`), as FastAPI solves each dependency per request (~12 µs).
    """
    state = request.scope.setdefault("state", {})
    principal: Principal | None = state.get("principal")
    if principal is None:
        platform: Platform = request.app.state.platform
        principal = await platform.authenticator.authenticate(request.headers.get("authorization"))
        bind_principal(state, principal)
        await check_principal(platform, principal, state)
    if not principal.has_role(role):
        raise Problem(
            f"this needs the {role} role",
            status=403,
            slug="insufficient-role",
            title="Insufficient role",
        )
    return principal


def require(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits principals with at least `role` in their tenant."""

    async def dependency(request: Request) -> Principal:
        return await authorize(request, role)

    dependency.__name__ = f"require_{role}"
    return dependency


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
