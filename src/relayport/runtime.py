"""Build and tear down the process-wide platform: used by `serve`, `worker`, `admin` and tests."""

from __future__ import annotations

import logging

import redis.asyncio

from relayport.core import migrate
from relayport.core.auth.principal import Authenticator
from relayport.core.auth.tokens import TokenIssuer
from relayport.core.broker import create_broker
from relayport.core.crypto import KeyRing
from relayport.core.db import Database
from relayport.core.platform import Platform
from relayport.core.pubsub import create_pubsub
from relayport.core.ratelimit import MemoryRateLimiter, RateLimiter
from relayport.core.ratelimit_redis import RedisRateLimiter
from relayport.settings import Settings

log = logging.getLogger("relayport.runtime")


async def build_platform(settings: Settings, *, migrate_schema: bool | None = None) -> Platform:
    """Connect everything the settings name. Migrates first when asked (or by default on SQLite)."""
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    if settings.should_auto_migrate if migrate_schema is None else migrate_schema:
        await migrate.upgrade(db)
    redis_client = None
    if settings.redis_url:
        # A blocking pool makes a burst wait briefly for a connection instead of failing with
        # MaxConnectionsError (the default pool raises past its size).
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections, timeout=20
        )
        redis_client = redis.asyncio.Redis(connection_pool=pool)
    broker = create_broker(settings)
    pubsub = create_pubsub(settings, prefix=f"{settings.redis_key_prefix}ps:")
    platform = Platform(
        settings=settings,
        db=db,
        keyring=KeyRing.from_settings(settings),
        authenticator=Authenticator(db, TokenIssuer.from_settings(settings)),
        limiter=_limiter(settings, redis_client),
        broker=broker,
        pubsub=pubsub,
        redis=redis_client,
    )
    await broker.start()
    await pubsub.start()
    return platform


def _limiter(settings: Settings, redis_client: redis.asyncio.Redis | None) -> RateLimiter:
    if redis_client is None:
        return MemoryRateLimiter()
    return RedisRateLimiter(redis_client, prefix=f"{settings.redis_key_prefix}rl:")


async def close_platform(platform: Platform) -> None:
    await platform.authenticator.drain()
    for closer in (platform.broker.close, platform.pubsub.close, platform.limiter.close):
        try:
            await closer()
        except Exception:
            log.exception("error while closing", extra={"event": "runtime.close"})
    if platform.redis is not None:
        await platform.redis.aclose()
    await platform.db.dispose()
