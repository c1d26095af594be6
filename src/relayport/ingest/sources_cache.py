"""Sources as the public endpoint needs them, cached per process for a few seconds.

A change made through the API is forgotten at once on the instance that made it and expires
within `RELAYPORT_INGEST__SOURCE_CACHE_TTL_S` on the others.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

from relayport.core.auth.principal import TTLCache
from relayport.core.crypto import DecryptionError
from relayport.core.platform import Platform
from relayport.core.ratelimit import Limit
from relayport.ingest import repository, signatures
from relayport.ingest.secrets import StoredSecret, open_secrets

log = logging.getLogger("relayport.ingest")

_CACHE_KEY = "ingest.sources"


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """What the hot path needs of a source, cached per process for a few seconds."""

    id: str
    tenant_id: str
    plan: str
    scheme: str
    secrets: tuple[StoredSecret, ...]
    tolerance_s: int
    body_limit_bytes: int
    hmac: signatures.HmacConfig | None
    type_pointer: str | None
    max_attempts: int
    enabled: bool

    def active_secrets(self, now: dt.datetime) -> list[str]:
        return [s.value for s in self.secrets if s.active(now)]


@dataclass(frozen=True, slots=True)
class _Entry:
    config: SourceConfig | None  # None: no such source (cached too, against floods of bad ids)


class SourceCache:
    """Sources by id for `ttl_s`; concurrent misses for one id share a single database read."""

    def __init__(self, ttl_s: float, max_items: int = 10_000) -> None:
        self._cache: TTLCache[str, _Entry] = TTLCache(ttl_s, max_items)
        self._loading: dict[str, asyncio.Future[SourceConfig | None]] = {}
        # Each source's rate limits, built once per loaded config (a reloaded source is a new
        # config object, which rebuilds them).
        self.limits: dict[str, tuple[SourceConfig, list[Limit]]] = {}

    def cached(self, source_id: str) -> SourceConfig | None:
        """The source if this process holds it (None when unknown, expired or not cached)."""
        hit = self._cache.get(source_id)
        return hit.config if hit is not None else None

    def forget(self, source_id: str) -> None:
        self._cache.discard(source_id)

    async def get(self, platform: Platform, source_id: str) -> SourceConfig | None:
        hit = self._cache.get(source_id)
        if hit is not None:
            return hit.config
        pending = self._loading.get(source_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[SourceConfig | None] = asyncio.get_running_loop().create_future()
        self._loading[source_id] = future
        try:
            config = await _load(platform, source_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            self._loading.pop(source_id, None)
        self._cache.put(source_id, _Entry(config))
        future.set_result(config)
        return config


def source_cache(platform: Platform) -> SourceCache:
    cache = platform.extras.get(_CACHE_KEY)
    if cache is None:
        cache = platform.extras[_CACHE_KEY] = SourceCache(
            platform.settings.ingest.source_cache_ttl_s
        )
    assert isinstance(cache, SourceCache)
    return cache


async def _load(platform: Platform, source_id: str) -> SourceConfig | None:
    # Its own short session: the request's transaction must start with its INSERT (on SQLite
    # a transaction that read first may not be allowed to write later).
    async with platform.db.sessions() as session:
        found = await repository.source_with_plan(session, source_id)
    if found is None:
        return None
    source, plan = found
    try:
        stored = tuple(open_secrets(platform.keyring, source))
    except (DecryptionError, ValueError, KeyError):
        # Every delivery will be refused as "bad-secret" until someone rotates the secret.
        log.error(
            "source secrets cannot be opened",
            extra={"event": "ingest.secrets_unreadable", "source_id": source.id},
        )
        stored = ()
    hmac_config = None
    if source.scheme == "hmac" and source.hmac_header:
        hmac_config = signatures.HmacConfig(
            header=source.hmac_header,
            algorithm=source.hmac_algorithm or "sha256",
            encoding=source.hmac_encoding or "hex",
            prefix=source.hmac_prefix or "",
            timestamp_header=source.hmac_timestamp_header,
        )
    return SourceConfig(
        id=source.id,
        tenant_id=source.tenant_id,
        plan=plan,
        scheme=source.scheme,
        secrets=stored,
        tolerance_s=source.tolerance_s,
        body_limit_bytes=source.body_limit_bytes,
        hmac=hmac_config,
        type_pointer=source.type_pointer,
        max_attempts=source.max_attempts,
        enabled=source.enabled,
    )
