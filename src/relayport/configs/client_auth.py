"""Client keys: read-only credentials scoped to one environment, for the client API.

Stored as SHA-256 (they carry 256 random bits, as API keys do), looked up by hash, compared again
in constant time, and cached for a few seconds per process so streams and polls stay cheap.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from sqlalchemy import select

from relayport.configs.models import ClientKey
from relayport.configs.service import CLIENT_KEY_PREFIX
from relayport.core.auth.principal import TTLCache
from relayport.core.auth.tokens import sha256_hex
from relayport.core.errors import RateLimited, Unauthorized
from relayport.core.platform import Platform
from relayport.core.ratelimit import Limit

CACHE = "configs.client_keys"


@dataclass(frozen=True)
class ClientPrincipal:
    """What a client key may do; `kind` and `id` make it an audit actor."""

    id: str
    tenant_id: str
    environment_id: str
    secrets: bool
    key_hash: str
    kind: str = "client_key"


def _cache(platform: Platform) -> TTLCache[str, ClientPrincipal | None]:
    cache = platform.extras.get(CACHE)
    if cache is None:
        cache = platform.extras[CACHE] = TTLCache()
    return cache


def forget(platform: Platform, key_hash: str) -> None:
    """Drop a key from this process's cache (after revoking it)."""
    _cache(platform).discard(key_hash)


async def authenticate(platform: Platform, authorization: str | None) -> ClientPrincipal:
    """The client key in `Authorization: Bearer rpc_…`, or 401 `invalid-client-key`."""
    if not authorization:
        raise Unauthorized("send Authorization: Bearer <client key>")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential.startswith(CLIENT_KEY_PREFIX):
        raise Unauthorized("a client key is needed", slug="invalid-client-key")
    if len(credential) > 200:
        raise Unauthorized("invalid client key", slug="invalid-client-key")
    digest = sha256_hex(credential)
    cache = _cache(platform)
    principal = cache.get(digest)
    if principal is None:
        async with platform.db.sessions() as session:
            row = (
                await session.execute(select(ClientKey).where(ClientKey.key_hash == digest))
            ).scalar_one_or_none()
        if row is not None and row.revoked_at is None:
            principal = ClientPrincipal(
                row.id, row.tenant_id, row.environment_id, row.secrets, row.key_hash
            )
        cache.put(digest, principal)
    if principal is None or not hmac.compare_digest(principal.key_hash, digest):
        raise Unauthorized("invalid client key", slug="invalid-client-key")
    return principal


async def spend(
    platform: Platform, principal: ClientPrincipal, *, ip: str | None = None, cost: int = 1
) -> None:
    """Spend the client key's bucket (and, given `ip`, the per-IP bucket: WebSocket connects
    pass no HTTP middleware); raise `RateLimited` with Retry-After when one refuses.

    Client keys are shared by whole fleets, so their bucket is wide; it bounds what a leaked
    or runaway key can make the database do, not what one well-behaved client does.
    """
    ratelimit = platform.settings.ratelimit
    if not ratelimit.enabled:
        return
    settings = platform.settings.configs
    limits = [
        Limit.bucket(
            f"ck:{principal.id}",
            rate=settings.client_key_requests_per_second,
            burst=settings.client_key_burst,
            cost=cost,
        )
    ]
    if ip is not None:
        limits.append(
            Limit.bucket(
                f"ip:{ip}", rate=ratelimit.ip_requests_per_second, burst=ratelimit.ip_burst
            )
        )
    for decision in await platform.limiter.check(limits):
        if not decision.allowed:
            raise RateLimited("slow down: this client key is over its rate limit",
                              headers=decision.headers())  # fmt: skip
