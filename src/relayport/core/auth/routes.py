"""HTTP surface of identity: /v1/auth, /v1/me, /v1/users, /v1/api-keys."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from relayport.core.asgi_route import add_json_route
from relayport.core.auth import service
from relayport.core.auth.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    LoginRequest,
    MeResponse,
    PingResponse,
    RefreshRequest,
    SignupRequest,
    SignupResponse,
    TenantOut,
    TokenResponse,
    UserOut,
    UserUpdate,
)
from relayport.core.deps import (
    Admin,
    PlatformDep,
    ReadSessionDep,
    SessionDep,
    Viewer,
    after_commit,
    authorize,
    client_ip,
    platform_of,
)
from relayport.core.errors import RateLimited
from relayport.core.paging import page_openapi, page_params
from relayport.core.schemas import ListResponse
from relayport.core.tenants import get_tenant

router = APIRouter(prefix="/v1")


def _tokens(tokens: service.Tokens) -> dict[str, object]:
    return {
        "access_token": tokens.access_token,
        "token_type": "Bearer",
        "expires_in": tokens.expires_in,
        "refresh_token": tokens.refresh_token,
        "refresh_token_expires_in": tokens.refresh_token_expires_in,
    }


def _user(user: Any) -> UserOut:
    # An ORM row or a driver record (core.fastread): both have the attributes by name.
    return UserOut.model_validate(user, from_attributes=True)


def _key(key: Any) -> ApiKeyOut:
    # An ORM row or a driver record (core.fastread): both have the attributes by name.
    return ApiKeyOut.model_validate(key, from_attributes=True)


@router.post(
    "/auth/signup", status_code=201, response_model=SignupResponse, tags=["auth"], summary="Sign up"
)
async def signup(
    body: SignupRequest, request: Request, session: SessionDep, platform: PlatformDep
) -> dict[str, object]:
    """Create an account and a new tenant; the first user is the tenant's admin. Public."""
    user, tenant, tokens = await service.signup(
        session,
        platform.authenticator.issuer,
        refresh_ttl_s=platform.settings.auth.refresh_token_ttl_s,
        email=body.email,
        password=body.password,
        tenant_name=body.tenant_name,
        ip=client_ip(request),
    )
    return {
        **_tokens(tokens),
        "user": _user(user),
        "tenant": TenantOut.model_validate(tenant, from_attributes=True),
    }


@router.post("/auth/login", response_model=TokenResponse, tags=["auth"], summary="Log in")
async def login(
    body: LoginRequest, request: Request, session: SessionDep, platform: PlatformDep
) -> dict[str, object]:
    """Exchange email and password for an access token and a refresh token. Public."""
    auth = platform.settings.auth
    # Guessing is throttled per account and client IP: keyed on the account alone, anyone
    # could lock any account out by failing its login on purpose.
    ip = client_ip(request)
    decision = await platform.limiter.hit(
        f"login:{service.normalize_email(body.email)}:{ip}",
        rate=auth.max_failed_logins / 900,
        burst=auth.max_failed_logins,
    )
    if not decision.allowed:
        raise RateLimited(
            "too many login attempts for this account",
            slug="login-throttled",
            headers=decision.headers(),
        )
    tokens = await service.login(
        session,
        platform.authenticator.issuer,
        refresh_ttl_s=auth.refresh_token_ttl_s,
        email=body.email,
        password=body.password,
        ip=ip,
        lookup=platform.db.sessions(),
    )
    return _tokens(tokens)


@router.post("/auth/refresh", response_model=TokenResponse, tags=["auth"], summary="Refresh")
async def refresh(
    body: RefreshRequest, request: Request, session: SessionDep, platform: PlatformDep
) -> dict[str, object]:
    """Rotate a refresh token. Reusing a spent refresh token revokes its whole session. Public."""
    tokens = await service.refresh(
        session,
        platform.authenticator.issuer,
        refresh_ttl_s=platform.settings.auth.refresh_token_ttl_s,
        refresh_token=body.refresh_token,
        ip=client_ip(request),
    )
    return _tokens(tokens)


@router.post("/auth/logout", status_code=204, tags=["auth"], summary="Log out")
async def logout(body: RefreshRequest, request: Request, session: SessionDep) -> Response:
    """Revoke the session the refresh token belongs to. Public (the token is the proof)."""
    await service.logout(session, refresh_token=body.refresh_token, ip=client_ip(request))
    return Response(status_code=204)


async def ping(request: Request) -> bytes:
    """Answers when the credentials are valid, without touching the database. Role: viewer."""
    principal = await authorize(request, "viewer")
    return orjson.dumps(
        {"status": "ok", "principal": principal.id, "tenant_id": principal.tenant_id}
    )


# Served without FastAPI's request handling (core.asgi_route): the route exists to be cheap.
add_json_route(
    router,
    "/ping",
    ping,
    methods=["GET"],
    response_model=PingResponse,
    tags=["auth"],
    summary="Check credentials",
)


@router.get("/me", response_model=MeResponse, tags=["auth"], summary="Who am I")
async def me(principal: Viewer, session: ReadSessionDep) -> dict[str, object]:
    """The calling principal and its tenant. Role: viewer."""
    tenant = await get_tenant(session, principal.tenant_id)
    return {
        "kind": principal.kind,
        "id": principal.id,
        "role": principal.role,
        "tenant": TenantOut.model_validate(tenant, from_attributes=True),
    }


@router.get(
    "/users", response_model=ListResponse[UserOut], tags=["users"], openapi_extra=page_openapi()
)
async def list_users(request: Request) -> ListResponse[UserOut]:
    """Users of the caller's tenant, newest first. Role: admin."""
    principal = await authorize(request, "admin")
    limit, after = page_params(request)
    page = await service.USER_READS.page(
        platform_of(request).db.driver, principal.tenant_id, limit=limit, after=after
    )
    return ListResponse(data=[_user(u) for u in page.items], next=page.next)


@router.get("/users/{user_id}", response_model=UserOut, tags=["users"])
async def get_user(user_id: str, request: Request) -> UserOut:
    """One user. Role: admin."""
    principal = await authorize(request, "admin")
    driver = platform_of(request).db.driver
    return _user(await service.USER_READS.get(driver, principal.tenant_id, user_id))


@router.patch("/users/{user_id}", response_model=UserOut, tags=["users"])
async def update_user(
    user_id: str,
    body: UserUpdate,
    request: Request,
    principal: Admin,
    session: SessionDep,
    platform: PlatformDep,
) -> UserOut:
    """Change a user's role or deactivate them (audited). Role: admin."""
    user, key_hashes = await service.update_user(
        session,
        principal,
        user_id,
        role=body.role,
        is_active=body.is_active,
        ip=client_ip(request),
    )

    def forget() -> None:
        platform.authenticator.forget_user(user.id)
        for key_hash in key_hashes:
            platform.authenticator.forget_key(key_hash)

    after_commit(session, forget)
    return _user(user)


@router.post("/api-keys", status_code=201, response_model=ApiKeyCreated, tags=["api-keys"])
async def create_api_key(
    body: ApiKeyCreate, request: Request, principal: Admin, session: SessionDep
) -> ApiKeyCreated:
    """Create an API key. The secret is in this response only. Role: admin."""
    key, secret = await service.create_api_key(
        session,
        principal,
        name=body.name,
        role=body.role,
        expires_in_s=body.expires_in_s,
        ip=client_ip(request),
    )
    return ApiKeyCreated(**_key(key).model_dump(), key=secret)


_KEY_LIST = ListResponse[ApiKeyOut]


async def list_api_keys(request: Request) -> bytes:
    """API keys of the tenant (never their secrets), newest first. Role: admin."""
    principal = await authorize(request, "admin")
    limit, after = page_params(request)
    page = await service.API_KEY_READS.page(
        platform_of(request).db.driver, principal.tenant_id, limit=limit, after=after
    )
    return _KEY_LIST(data=[_key(k) for k in page.items], next=page.next).model_dump_json().encode()


add_json_route(
    router,
    "/api-keys",
    list_api_keys,
    methods=["GET"],
    response_model=_KEY_LIST,
    tags=["api-keys"],
    openapi_extra=page_openapi(),
)


@router.get("/api-keys/{key_id}", response_model=ApiKeyOut, tags=["api-keys"])
async def get_api_key(key_id: str, request: Request) -> ApiKeyOut:
    """One API key. Role: admin."""
    principal = await authorize(request, "admin")
    driver = platform_of(request).db.driver
    return _key(await service.API_KEY_READS.get(driver, principal.tenant_id, key_id))


@router.delete("/api-keys/{key_id}", status_code=204, tags=["api-keys"])
async def revoke_api_key(
    key_id: str, request: Request, principal: Admin, session: SessionDep, platform: PlatformDep
) -> Response:
    """Revoke an API key; it stops working at once on this instance. Role: admin."""
    key = await service.revoke_api_key(session, principal, key_id, ip=client_ip(request))
    after_commit(session, lambda: platform.authenticator.forget_key(key.key_hash))
    return Response(status_code=204)
