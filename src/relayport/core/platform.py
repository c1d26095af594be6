"""The process-wide parts every request and worker shares, built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from relayport.core.auth.principal import Authenticator
    from relayport.core.broker import Broker
    from relayport.core.crypto import KeyRing
    from relayport.core.db import Database
    from relayport.core.pubsub import PubSub
    from relayport.core.ratelimit import RateLimiter
    from relayport.settings import Settings


@dataclass
class Platform:
    settings: Settings
    db: Database
    keyring: KeyRing
    authenticator: Authenticator
    limiter: RateLimiter
    broker: Broker
    pubsub: PubSub
    redis: Redis | None = None
    # Capabilities hang their own process-wide objects here by name.
    extras: dict[str, Any] = field(default_factory=dict)
