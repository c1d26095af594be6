"""Identity logic: signup, login, refresh-token rotation, API keys, roles. Takes a session, never
commits, knows nothing of HTTP."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core import audit
from relayport.core.auth.models import ApiKey, RefreshToken, User
from relayport.core.auth.passwords import hash_password, needs_rehash, verify_password
from relayport.core.auth.principal import ROLE_RANK, Principal
from relayport.core.auth.tokens import (
    API_KEY_PREFIX,
    REFRESH_PREFIX,
    TokenIssuer,
    random_secret,
    sha256_hex,
)
from relayport.core.db import utcnow
from relayport.core.errors import Conflict, Problem, Unauthorized
from relayport.core.ids import new_id
from relayport.core.repository import TenantReads, TenantRepository
from relayport.core.tenants import Tenant, create_tenant


@dataclass(frozen=True)
class Tokens:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_token_expires_in: int


class UserRepository(TenantRepository[User]):
    model = User
    not_found_detail = "no such user"


# The list and get-by-id GET routes read on the driver (see core.fastread).
USER_READS = TenantReads(
    User.__table__, exclude={"password_hash"}, not_found_detail=UserRepository.not_found_detail
)


class ApiKeyRepository(TenantRepository[ApiKey]):
    model = ApiKey
    not_found_detail = "no such API key"


API_KEY_READS = TenantReads(
    ApiKey.__table__, exclude={"key_hash"}, not_found_detail=ApiKeyRepository.not_found_detail
)


def normalize_email(email: str) -> str:
    return email.strip().lower()


async def _issue(
    session: AsyncSession, issuer: TokenIssuer, refresh_ttl_s: int, user: User, family: str
) -> Tokens:
    access, ttl = issuer.issue(user_id=user.id, tenant_id=user.tenant_id, role=user.role)
    refresh = random_secret(REFRESH_PREFIX)
    session.add(
        RefreshToken(
            id=new_id("rft"),
            tenant_id=user.tenant_id,
            user_id=user.id,
            family_id=family,
            token_hash=sha256_hex(refresh),
            created_at=utcnow(),
            expires_at=utcnow() + dt.timedelta(seconds=refresh_ttl_s),
        )
    )
    return Tokens(access, ttl, refresh, refresh_ttl_s)


async def signup(
    session: AsyncSession,
    issuer: TokenIssuer,
    *,
    refresh_ttl_s: int,
    email: str,
    password: str,
    tenant_name: str | None,
    ip: str | None,
) -> tuple[User, Tenant, Tokens]:
    """Create a user and a new tenant whose first user is its admin."""
    email = normalize_email(email)
    # Hash before touching the database so no pooled connection waits on Argon2.
    password_hash = await hash_password(password)
    existing = await session.scalar(select(User.id).where(User.email == email))
    if existing is not None:
        raise Conflict("an account with this email exists", slug="email-taken")
    tenant = await create_tenant(session, name=tenant_name or email.split("@", 1)[0])
    user = User(
        id=new_id("usr"),
        tenant_id=tenant.id,
        email=email,
        password_hash=password_hash,
        role="admin",
        is_active=True,
        created_at=utcnow(),
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent signup with the same email won the race
        raise Conflict("an account with this email exists", slug="email-taken") from exc
    audit.record(
        session,
        action="auth.signup",
        tenant_id=tenant.id,
        actor_type="user",
        actor_id=user.id,
        ip=ip,
        target_type="user",
        target_id=user.id,
    )
    tokens = await _issue(session, issuer, refresh_ttl_s, user, new_id("fam"))
    return user, tenant, tokens


async def login(
    session: AsyncSession,
    issuer: TokenIssuer,
    *,
    refresh_ttl_s: int,
    email: str,
    password: str,
    ip: str | None,
    lookup: AsyncSession | None = None,
) -> Tokens:
    """Exchange credentials for tokens. Every outcome is audited; failures keep their audit row.

    `lookup` is a short-lived session for reading the hash: the request's session must not hold
    a pooled connection while the (deliberately slow) verification runs.
    """
    email = normalize_email(email)
    reader = lookup or session
    found = (
        await reader.execute(select(User.id, User.password_hash).where(User.email == email))
    ).first()
    if lookup is not None:
        await lookup.close()
    ok = await verify_password(found.password_hash if found else None, password)
    user = await session.get(User, found.id) if found else None
    if user is None or not ok or not user.is_active:
        audit.record(
            session,
            action="auth.login.failed",
            tenant_id=user.tenant_id if user else None,
            actor_type="anonymous",
            actor_id=user.id if user else None,
            ip=ip,
            details={"reason": "inactive" if ok and user else "bad-credentials"},
        )
        raise Unauthorized("wrong email or password", slug="invalid-credentials", commit=True)
    if needs_rehash(user.password_hash):
        user.password_hash = await hash_password(password)
    user.last_login_at = utcnow()
    audit.record(
        session,
        action="auth.login.succeeded",
        tenant_id=user.tenant_id,
        actor_type="user",
        actor_id=user.id,
        ip=ip,
    )
    return await _issue(session, issuer, refresh_ttl_s, user, new_id("fam"))


async def refresh(
    session: AsyncSession,
    issuer: TokenIssuer,
    *,
    refresh_ttl_s: int,
    refresh_token: str,
    ip: str | None,
) -> Tokens:
    """Rotate a refresh token. Presenting a spent one revokes its whole family (theft signal)."""
    now = utcnow()
    row = await session.scalar(
        select(RefreshToken).where(RefreshToken.token_hash == sha256_hex(refresh_token))
    )
    if row is None:
        raise Unauthorized("invalid refresh token", slug="invalid-refresh-token")
    if row.used_at is not None or row.revoked_at is not None:
        await _revoke_family(session, row.family_id, now)
        audit.record(
            session,
            action="auth.refresh.reused",
            tenant_id=row.tenant_id,
            actor_type="anonymous",
            actor_id=row.user_id,
            ip=ip,
            details={"family_id": row.family_id},
        )
        raise Unauthorized(
            "refresh token already used; the session is revoked",
            slug="refresh-token-reused",
            commit=True,
        )
    if row.expires_at <= now:
        raise Unauthorized("refresh token expired", slug="refresh-token-expired")
    # Claim the token with a guarded update so two concurrent refreshes cannot both succeed.
    claimed = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.id == row.id, RefreshToken.used_at.is_(None))
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        # A concurrent refresh of the same token won (a double click, a client retry): refuse
        # this one without revoking, or the winner's fresh session would die with it. A replay
        # after the fact still hits the `used_at` branch above and revokes the family.
        raise Unauthorized("refresh token already used", slug="refresh-token-reused")
    user = await session.get(User, row.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("invalid refresh token", slug="invalid-refresh-token")
    return await _issue(session, issuer, refresh_ttl_s, user, row.family_id)


async def _revoke_family(session: AsyncSession, family_id: str, now: dt.datetime) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )


async def logout(session: AsyncSession, *, refresh_token: str, ip: str | None) -> None:
    """Revoke the refresh token's family. Unknown tokens are ignored (logout is idempotent)."""
    row = await session.scalar(
        select(RefreshToken).where(RefreshToken.token_hash == sha256_hex(refresh_token))
    )
    if row is None:
        return
    await _revoke_family(session, row.family_id, utcnow())
    audit.record(
        session,
        action="auth.logout",
        tenant_id=row.tenant_id,
        actor_type="user",
        actor_id=row.user_id,
        ip=ip,
    )


async def create_api_key(
    session: AsyncSession,
    principal: Principal,
    *,
    name: str,
    role: str,
    expires_in_s: int | None,
    ip: str | None,
) -> tuple[ApiKey, str]:
    """A new key; the plaintext is returned once and never stored."""
    if ROLE_RANK[role] > ROLE_RANK[principal.role]:
        raise Problem(
            "a key cannot have a higher role than its creator",
            status=403,
            slug="insufficient-role",
            title="Insufficient role",
        )
    secret = random_secret(API_KEY_PREFIX)
    now = utcnow()
    key = ApiKey(
        id=new_id("key"),
        tenant_id=principal.tenant_id,
        name=name,
        prefix=secret[:11],
        key_hash=sha256_hex(secret),
        role=role,
        created_by=principal.id,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=expires_in_s) if expires_in_s else None,
    )
    session.add(key)
    audit.record_by(
        session,
        principal,
        "api_key.created",
        ip=ip,
        target_type="api_key",
        target_id=key.id,
        details={"role": role, "name": name},
    )
    return key, secret


async def revoke_api_key(
    session: AsyncSession, principal: Principal, key_id: str, *, ip: str | None
) -> ApiKey:
    key = await ApiKeyRepository(session, principal.tenant_id).get(key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        audit.record_by(
            session,
            principal,
            "api_key.revoked",
            ip=ip,
            target_type="api_key",
            target_id=key.id,
        )
    return key


async def update_user(
    session: AsyncSession,
    principal: Principal,
    user_id: str,
    *,
    role: str | None,
    is_active: bool | None,
    ip: str | None,
) -> tuple[User, list[str]]:
    """Change a user's role or active flag; returns the user and the hashes of API keys whose
    access changed (for cache invalidation).

    A tenant always keeps one active admin, even under concurrent demotions: the admin rows are
    locked (PostgreSQL) and the final UPDATE re-checks the count in the same statement (SQLite
    serializes writers, so that statement sees every committed demotion).
    """
    user = await UserRepository(session, principal.tenant_id).get(user_id)
    new_role = role if role is not None else user.role
    new_active = is_active if is_active is not None else user.is_active
    losing_admin = (
        user.role == "admin" and user.is_active and not (new_role == "admin" and new_active)
    )
    if losing_admin:
        await session.execute(
            select(User.id)
            .where(User.tenant_id == principal.tenant_id, User.role == "admin", User.is_active)
            .with_for_update()
        )
        others = (
            select(func.count())
            .select_from(User)
            .where(
                User.tenant_id == principal.tenant_id,
                User.role == "admin",
                User.is_active,
                User.id != user.id,
            )
            .scalar_subquery()
        )
        changed = await session.execute(
            update(User)
            .where(User.id == user.id, others >= 1)
            .values(role=new_role, is_active=new_active)
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict("a tenant needs at least one active admin", slug="last-admin")
    if new_role != user.role:
        audit.record_by(
            session,
            principal,
            "user.role_changed",
            ip=ip,
            target_type="user",
            target_id=user.id,
            details={"from": user.role, "to": new_role},
        )
    if new_active != user.is_active:
        audit.record_by(
            session,
            principal,
            "user.activated" if new_active else "user.deactivated",
            ip=ip,
            target_type="user",
            target_id=user.id,
        )
    user.role, user.is_active = new_role, new_active
    now = utcnow()
    if not new_active:
        await session.execute(
            update(RefreshToken)
            .where(RefreshToken.user_id == user.id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    return user, await _limit_keys_of(session, principal, user, now, ip)


async def _limit_keys_of(
    session: AsyncSession, principal: Principal, user: User, now: dt.datetime, ip: str | None
) -> list[str]:
    """Keys a user made never outlive or outrank them: revoke them when the user is
    deactivated, lower them to the user's new role on a demotion."""
    keys = (
        await session.scalars(
            select(ApiKey).where(
                ApiKey.tenant_id == principal.tenant_id,
                ApiKey.created_by == user.id,
                ApiKey.revoked_at.is_(None),
            )
        )
    ).all()
    touched = []
    for key in keys:
        if not user.is_active:
            key.revoked_at = now
            action, details = "api_key.revoked", {"reason": "creator deactivated"}
        elif ROLE_RANK[key.role] > ROLE_RANK[user.role]:
            action, details = "api_key.role_lowered", {"from": key.role, "to": user.role}
            key.role = user.role
        else:
            continue
        touched.append(key.key_hash)
        audit.record_by(
            session,
            principal,
            action,
            ip=ip,
            target_type="api_key",
            target_id=key.id,
            details=details,
        )
    return touched
