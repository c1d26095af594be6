"""Fan-out messaging: every subscriber of a channel, in every process, gets each message.

Usage::

    async with pubsub.subscribe("configs.ten_1") as subscription:
        async for message in subscription:  # bytes
            ...

A subscription is live when `subscribe()` has entered: a message published after that reaches
it. Delivery is at-most-once, as with Redis pub/sub itself; there is no replay. When a
subscription may have missed messages (its buffer overflowed because the reader is too slow,
or the Redis connection dropped) iterating it raises `SubscriptionLost` after the messages it
still holds, so the reader can resubscribe and re-read the state from the database instead of
silently running on a gap. `close()` ends every subscription's iteration normally.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from relayport.settings import Settings

DEFAULT_PREFIX = "relayport:"
DEFAULT_MAX_BUFFER = 1_000


class PubSubError(RuntimeError):
    """The pub/sub backend could not be reached or refused an operation."""


class SubscriptionLost(PubSubError):
    """This subscription may have missed messages; resubscribe and re-read current state."""


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_LOST: Final = _Marker("lost")
_CLOSED: Final = _Marker("closed")


class Subscription:
    """An async iterator of the messages of one channel, made by `PubSub.subscribe`."""

    def __init__(self, channel: str, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.channel = channel
        self._max_buffer = max_buffer
        self._items: asyncio.Queue[bytes | _Marker] = asyncio.Queue()
        self._ended: _Marker | None = None  # set once the end marker is queued
        self._reason = ""

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        item = await self._items.get()
        if isinstance(item, bytes):
            return item
        self._items.put_nowait(item)  # keep raising on every later call, as iterators do
        if item is _LOST:
            raise SubscriptionLost(f"subscription to {self.channel!r} lost: {self._reason}")
        raise StopAsyncIteration

    def deliver(self, message: bytes) -> None:
        if self._ended is not None:
            return
        if self._items.qsize() >= self._max_buffer:
            # Dropping silently would leave the reader on a gap it cannot see.
            self.lose("reader too slow, buffer full")
            return
        self._items.put_nowait(message)

    def lose(self, reason: str) -> None:
        if self._ended is None:
            self._ended, self._reason = _LOST, reason
            self._items.put_nowait(_LOST)

    def end(self) -> None:
        if self._ended is None:
            self._ended = _CLOSED
            self._items.put_nowait(_CLOSED)


class SubscriberSet:
    """This process's subscriptions by channel; both backends fan out through one of these."""

    def __init__(self) -> None:
        self._by_channel: defaultdict[str, set[Subscription]] = defaultdict(set)

    def add(self, subscription: Subscription) -> bool:
        """Add; True when it is the channel's first local subscriber."""
        subscribers = self._by_channel[subscription.channel]
        subscribers.add(subscription)
        return len(subscribers) == 1

    def remove(self, subscription: Subscription) -> bool:
        """Remove; True when the channel has no local subscriber left."""
        subscribers = self._by_channel.get(subscription.channel)
        if subscribers is None:
            return False
        subscribers.discard(subscription)
        if subscribers:
            return False
        del self._by_channel[subscription.channel]
        return True

    def deliver(self, channel: str, message: bytes) -> None:
        for subscription in tuple(self._by_channel.get(channel, ())):
            subscription.deliver(message)

    def channels(self) -> list[str]:
        return list(self._by_channel)

    def lose_all(self, reason: str) -> None:
        for subscription in self._drain():
            subscription.lose(reason)

    def end_all(self) -> None:
        for subscription in self._drain():
            subscription.end()

    def _drain(self) -> list[Subscription]:
        everyone = [s for subscribers in self._by_channel.values() for s in subscribers]
        self._by_channel.clear()
        return everyone


class PubSub(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None:
        """End every subscription and release connections."""

    async def ping(self) -> None:
        """Raise `PubSubError` unless the backend answers."""

    async def publish(self, channel: str, message: bytes) -> None: ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for the duration of the `async with` block."""
        ...


class InProcessPubSub:
    """Fan-out within this process: the embedded default."""

    def __init__(self, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self._max_buffer = max_buffer
        self._subscribers = SubscriberSet()
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        self._subscribers.end_all()

    async def ping(self) -> None:
        if not self._started:
            raise PubSubError("in-process pub/sub is not started")

    async def publish(self, channel: str, message: bytes) -> None:
        if not self._started:
            raise PubSubError("in-process pub/sub is not started")
        self._subscribers.deliver(channel, message)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        if not self._started:
            raise PubSubError("in-process pub/sub is not started")
        subscription = Subscription(channel, max_buffer=self._max_buffer)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.remove(subscription)


def create_pubsub(settings: Settings, *, prefix: str = DEFAULT_PREFIX) -> PubSub:
    """In-process without `redis_url`, else Redis with channels named `<prefix><channel>`."""
    if settings.redis_url is None:
        return InProcessPubSub()
    from relayport.core.pubsub_redis import RedisPubSub

    return RedisPubSub(settings.redis_url, prefix=prefix)
