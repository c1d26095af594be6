"""Who is calling: one principal (a user or an API key) bound to one tenant, per request.

Verification is cheap on the hot path: API keys are looked up by SHA-256 and cached for a few
seconds; JWTs are verified locally and the user row (role, active) is cached the same way, so a
demotion or a revocation takes effect within `CACHE_TTL_S` on every instance and at once on the
instance that made it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import select, update

from relayport.core.auth.models import ROLES, ApiKey, User
from relayport.core.auth.tokens import API_KEY_PREFIX, TokenIssuer, sha256_hex
from relayport.core.db import Database, utcnow
from relayport.core.errors import Unauthorized
from relayport.core.tenants import Tenant

log = logging.getLogger("relayport.auth")

CACHE_TTL_S = 5.0
CACHE_MAX = 10_000
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}


@dataclass(frozen=True)
class Principal:
    kind: str  # "user" | "api_key"
    id: str
    tenant_id: str
    role: str
    plan: str

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A small LRU with expiry; per process, so entries stay short-lived."""

    def __init__(self, ttl_s: float = CACHE_TTL_S, max_items: int = CACHE_MAX) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: K, value: V) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()


@dataclass(frozen=True)
class _KeyEntry:
    principal: Principal | None  # None: unknown, revoked or disabled (negative cache)
    key_hash: str
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None


def _bearer(authorization: str) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` value, else None."""
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() == "bearer" and credential else None


class Authenticator:
    def __init__(self, db: Database, issuer: TokenIssuer) -> None:
        self.db = db
        self.issuer = issuer
        self._keys: TTLCache[str, _KeyEntry] = TTLCache()
        self._users: TTLCache[str, Principal | None] = TTLCache()
        self._touch_tasks: set[asyncio.Task[None]] = set()

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("send Authorization: Bearer <token or API key>")
        credential = _bearer(authorization)
        if credential is None:
            raise Unauthorized("use the Bearer scheme", slug="invalid-token")
        if credential.startswith(API_KEY_PREFIX):
            return await self._api_key(credential)
        return await self._jwt(credential)

    def cached(self, authorization: str | None) -> Principal | None:
        """The principal for these credentials if they are valid and already cached, without
        any I/O; None when they would need the database or are not valid (then
        `authenticate` gives the answer, with its reason)."""
        credential = _bearer(authorization) if authorization else None
        if credential is None:
            return None
        try:
            if credential.startswith(API_KEY_PREFIX):
                if len(credential) > 200:
                    return None
                digest = sha256_hex(credential)
                entry = self._keys.get(digest)
                return None if entry is None else self._admit_key(entry, digest)
            claims = self.issuer.verify(credential)
        except Unauthorized:
            return None
        principal = self._users.get(claims.user_id)
        if principal is None or principal.tenant_id != claims.tenant_id:
            return None
        return principal

    async def _api_key(self, key: str) -> Principal:
        if len(key) > 200:
            raise Unauthorized("invalid API key", slug="invalid-api-key")
        digest = sha256_hex(key)
        entry = self._keys.get(digest)
        if entry is None:
            entry = await self._load_key(digest)
            self._keys.put(digest, entry)
        return self._admit_key(entry, digest)

    def _admit_key(self, entry: _KeyEntry, digest: str) -> Principal:
        # The lookup was by hash; compare again in constant time so a cache or index quirk
        # can never match a different key.
        if entry.principal is None or not hmac.compare_digest(entry.key_hash, digest):
            raise Unauthorized("invalid API key", slug="invalid-api-key")
        now = utcnow()
        if entry.expires_at is not None and entry.expires_at <= now:
            raise Unauthorized("API key expired", slug="api-key-expired")
        if entry.last_used_at is None or now - entry.last_used_at > LAST_USED_RESOLUTION:
            self._keys.put(digest, _KeyEntry(entry.principal, digest, entry.expires_at, now))
            self._touch(entry.principal.id, now)
        return entry.principal

    async def _load_key(self, digest: str) -> _KeyEntry:
        async with self.db.sessions() as session:
            row = (
                await session.execute(
                    select(ApiKey, Tenant.plan)
                    .join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.key_hash == digest)
                )
            ).first()
        if row is None or row[0].revoked_at is not None:
            return _KeyEntry(None, digest, None, None)
        key, plan = row
        principal = Principal("api_key", key.id, key.tenant_id, key.role, plan)
        return _KeyEntry(principal, key.key_hash, key.expires_at, key.last_used_at)

    def _touch(self, key_id: str, when: dt.datetime) -> None:
        """Record last use off the request path, at most once a minute per key."""

        async def run() -> None:
            try:
                async with self.db.transaction() as session:
                    await session.execute(
                        update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when)
                    )
            except Exception:  # best effort: a missed timestamp must not fail requests
                log.warning("could not record API key use", extra={"event": "auth.key_touch"})

        task = asyncio.get_running_loop().create_task(run())
        self._touch_tasks.add(task)
        task.add_done_callback(self._touch_tasks.discard)

    async def _jwt(self, token: str) -> Principal:
        claims = self.issuer.verify(token)
        principal = self._users.get(claims.user_id)
        if principal is None:
            async with self.db.sessions() as session:
                row = (
                    await session.execute(
                        select(User, Tenant.plan)
                        .join(Tenant, Tenant.id == User.tenant_id)
                        .where(User.id == claims.user_id)
                    )
                ).first()
            if row is not None and row[0].is_active:
                user, plan = row
                principal = Principal("user", user.id, user.tenant_id, user.role, plan)
                self._users.put(claims.user_id, principal)
        if principal is None or principal.tenant_id != claims.tenant_id:
            raise Unauthorized("invalid access token", slug="invalid-token")
        return principal

    def forget_key(self, key_hash: str) -> None:
        self._keys.discard(key_hash)

    def forget_user(self, user_id: str) -> None:
        self._users.discard(user_id)

    async def drain(self) -> None:
        if self._touch_tasks:
            await asyncio.gather(*self._touch_tasks, return_exceptions=True)
