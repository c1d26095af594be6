"""The Redis `PubSub`: one subscriber connection per process, shared by every subscription.

Redis pub/sub delivers to connections, not to subscriptions, so this process SUBSCRIBEs a
channel once, on its first local subscriber, and fans each message out locally; the last local
subscriber leaving UNSUBSCRIBEs. `subscribe()` returns only once Redis has confirmed the
SUBSCRIBE, so a message published after it is never missed.

The subscriber connection runs without redis-py's transparent reconnect: a reconnect would
resubscribe quietly and hide the messages published while it was down. Instead a dropped
connection ends every subscription with `SubscriptionLost`, and the next `subscribe()` dials a
fresh connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub as RedisPubSubConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relayport.core.pubsub import (
    DEFAULT_MAX_BUFFER,
    DEFAULT_PREFIX,
    PubSubError,
    SubscriberSet,
    Subscription,
)

logger = logging.getLogger(__name__)


class RedisPubSub:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        timeout: float = 5.0,
        client_name: str = "relayport-pubsub",
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._max_buffer = max_buffer
        self._timeout = timeout
        self._client_name = client_name  # shows in CLIENT LIST, so operators can find it
        self._client: Redis | None = None
        self._listener_client: Redis | None = None
        self._listener: RedisPubSubConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._subscribers = SubscriberSet()
        self._on_redis: set[str] = set()  # channels SUBSCRIBEd on the current listener
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = Redis.from_url(
            self._url, socket_connect_timeout=self._timeout, socket_timeout=self._timeout
        )
        # No socket_timeout here: the listener waits on an idle connection indefinitely.
        self._listener_client = Redis.from_url(
            self._url,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=self._client_name,
        )
        try:
            await self._client.ping()
        except RedisError as exc:
            await self.close()
            raise PubSubError(f"Redis does not answer: {exc}") from exc

    async def close(self) -> None:
        async with self._lock:
            await self._drop_listener()
            self._subscribers.end_all()
        for client in (self._client, self._listener_client):
            if client is not None:
                await client.aclose()
        self._client = self._listener_client = None

    async def ping(self) -> None:
        try:
            await self._require_client().ping()
        except RedisError as exc:
            raise PubSubError(f"Redis does not answer: {exc}") from exc

    async def publish(self, channel: str, message: bytes) -> None:
        try:
            await self._require_client().publish(self._prefix + channel, message)
        except RedisError as exc:
            raise PubSubError(f"publish to {channel!r} failed: {exc}") from exc

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        subscription = Subscription(channel, max_buffer=self._max_buffer)
        await self._add(subscription)
        try:
            yield subscription
        finally:
            await self._remove(subscription)

    async def _add(self, subscription: Subscription) -> None:
        async with self._lock:
            self._require_client()
            if not self._subscribers.add(subscription):
                return
            name = self._prefix + subscription.channel
            try:
                await self._redis_subscribe(name)
            except BaseException as exc:
                self._subscribers.remove(subscription)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                # The listener's state is unknown now; the other subscriptions on it may have
                # missed messages, so they are told, and the next subscribe starts afresh.
                await self._reset_listener(f"subscribe failed: {exc!r}")
                if isinstance(exc, PubSubError):
                    raise
                raise PubSubError(f"cannot subscribe to {name!r}: {exc!r}") from exc

    async def _redis_subscribe(self, name: str) -> None:
        listener = self._ensure_listener()
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[name] = confirmed
        try:
            await listener.subscribe(name)
            self._on_redis.add(name)
            if self._reader is None:
                self._reader = asyncio.create_task(self._read(listener), name="pubsub-redis")
            await asyncio.wait_for(confirmed, self._timeout)
        finally:
            self._confirmations.pop(name, None)

    async def _remove(self, subscription: Subscription) -> None:
        async with self._lock:
            if not self._subscribers.remove(subscription):
                return
            name = self._prefix + subscription.channel
            if self._listener is None or name not in self._on_redis:
                return
            self._on_redis.discard(name)
            try:
                await self._listener.unsubscribe(name)
            except (RedisError, OSError):
                # The reader sees the same broken connection and ends the rest.
                logger.warning("pub/sub unsubscribe failed", exc_info=True)

    def _ensure_listener(self) -> RedisPubSubConnection:
        if self._listener is None:
            if self._listener_client is None:
                raise PubSubError("Redis pub/sub is not started")
            self._listener = self._listener_client.pubsub()
        return self._listener

    async def _read(self, listener: RedisPubSubConnection) -> None:
        prefix_len = len(self._prefix)
        while True:
            try:
                # timeout=None blocks until Redis sends something: no polling of an idle line.
                raw: Any = await listener.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "pub/sub connection lost",
                    extra={"event": "pubsub.connection_lost", "error": repr(exc)},
                )
                self._listener_failed(listener, repr(exc))
                return
            if not raw:
                continue
            kind, name = raw["type"], _text(raw["channel"])
            if kind == "message":
                self._subscribers.deliver(name[prefix_len:], bytes(raw["data"]))
            elif kind == "subscribe":
                confirmed = self._confirmations.get(name)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)

    def _listener_failed(self, listener: RedisPubSubConnection, reason: str) -> None:
        if listener is not self._listener:
            return
        self._listener, self._reader = None, None
        self._on_redis.clear()
        for confirmed in self._confirmations.values():
            if not confirmed.done():
                confirmed.set_exception(PubSubError(f"pub/sub connection lost: {reason}"))
        self._subscribers.lose_all(f"Redis connection lost: {reason}")
        # Runs in the reader task, which must not wait on its own transport: close elsewhere.
        task = asyncio.create_task(_close_listener(listener))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reset_listener(self, reason: str) -> None:
        await self._drop_listener()
        self._subscribers.lose_all(reason)

    async def _drop_listener(self) -> None:
        reader, listener = self._reader, self._listener
        self._reader, self._listener = None, None
        self._on_redis.clear()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if listener is not None:
            await _close_listener(listener)

    def _require_client(self) -> Redis:
        if self._client is None:
            raise PubSubError("Redis pub/sub is not started")
        return self._client


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _close_listener(listener: RedisPubSubConnection) -> None:
    try:
        await listener.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
    except Exception:
        logger.warning("closing the pub/sub connection failed", exc_info=True)
