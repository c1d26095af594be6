"""The PubSub contract, run in-process and against a real Redis (per-run channel prefix)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio

from relayport.core.pubsub import (
    InProcessPubSub,
    PubSub,
    Subscription,
    SubscriptionLost,
    create_pubsub,
)
from relayport.core.pubsub_redis import RedisPubSub
from relayport.settings import Settings
from tests.fixtures.services import wait_until

PubSubFactory = Callable[..., PubSub]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_pubsub(request: pytest.FixtureRequest) -> AsyncIterator[PubSubFactory]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    prefix = request.getfixturevalue("redis_prefix") if url else ""
    made: list[PubSub] = []

    def make(*, max_buffer: int = 1000) -> PubSub:
        pubsub: PubSub
        if url is None:
            pubsub = InProcessPubSub(max_buffer=max_buffer)
        else:
            pubsub = RedisPubSub(url, prefix=prefix, max_buffer=max_buffer)
        made.append(pubsub)
        return pubsub

    yield make
    for pubsub in made:
        await pubsub.close()


@pytest.fixture
def redis_target(redis_url: str, redis_prefix: str) -> tuple[str, str]:
    # One place names the imported fixtures, so only here does ruff see them "redefined".
    return redis_url, redis_prefix


@pytest.fixture
def channel() -> str:
    return f"ch.{secrets.token_hex(4)}"


async def next_message(subscription: Subscription) -> bytes:
    return await asyncio.wait_for(anext(subscription), 10)


async def test_every_subscriber_gets_each_message(make_pubsub: PubSubFactory, channel: str) -> None:
    pubsub = make_pubsub()
    await pubsub.start()
    async with pubsub.subscribe(channel) as first, pubsub.subscribe(channel) as second:
        await pubsub.publish(channel, b"one")
        await pubsub.publish(channel, b"two")
        assert [await next_message(first), await next_message(first)] == [b"one", b"two"]
        assert [await next_message(second), await next_message(second)] == [b"one", b"two"]


async def test_subscriber_sees_only_its_channel(make_pubsub: PubSubFactory, channel: str) -> None:
    pubsub = make_pubsub()
    await pubsub.start()
    async with pubsub.subscribe(channel) as mine:
        await pubsub.publish(channel + ".other", b"not-mine")
        await pubsub.publish(channel, b"mine")
        assert await next_message(mine) == b"mine"


async def test_remaining_subscriber_keeps_receiving_after_another_leaves(
    make_pubsub: PubSubFactory, channel: str
) -> None:
    pubsub = make_pubsub()
    await pubsub.start()
    async with pubsub.subscribe(channel) as staying:
        async with pubsub.subscribe(channel) as leaving:
            await pubsub.publish(channel, b"both")
            assert await next_message(leaving) == b"both"
        await pubsub.publish(channel, b"after")
        assert await next_message(staying) == b"both"
        assert await next_message(staying) == b"after"
    # The last one out unsubscribed; subscribing again must work from scratch.
    async with pubsub.subscribe(channel) as again:
        await pubsub.publish(channel, b"again")
        assert await next_message(again) == b"again"


async def test_slow_subscriber_is_told_it_lost_messages(
    make_pubsub: PubSubFactory, channel: str
) -> None:
    pubsub = make_pubsub(max_buffer=3)
    await pubsub.start()
    async with pubsub.subscribe(channel) as slow, pubsub.subscribe(channel) as probe:
        for i in range(5):
            await pubsub.publish(channel, f"m{i}".encode())
        # Wait until everything reached this process, via a subscriber that keeps up.
        seen = [await next_message(probe) for _ in range(3)]
        assert seen == [b"m0", b"m1", b"m2"]
        assert [await next_message(slow) for _ in range(3)] == [b"m0", b"m1", b"m2"]
        with pytest.raises(SubscriptionLost):
            await next_message(slow)


async def test_close_ends_subscriptions(make_pubsub: PubSubFactory, channel: str) -> None:
    pubsub = make_pubsub()
    await pubsub.start()
    async with pubsub.subscribe(channel) as subscription:
        await pubsub.publish(channel, b"last")
        assert await next_message(subscription) == b"last"
        waiting = asyncio.create_task(anext(subscription))
        await pubsub.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 10)


@pytest.mark.redis
async def test_message_reaches_subscriber_in_another_process(
    redis_target: tuple[str, str], channel: str
) -> None:
    url, prefix = redis_target
    publisher = RedisPubSub(url, prefix=prefix)
    listener = RedisPubSub(url, prefix=prefix)
    await publisher.start()
    await listener.start()
    try:
        async with listener.subscribe(channel) as remote, publisher.subscribe(channel) as local:
            await publisher.publish(channel, b"fan-out")
            assert await next_message(remote) == b"fan-out"
            assert await next_message(local) == b"fan-out"
    finally:
        await publisher.close()
        await listener.close()


@pytest.mark.redis
async def test_other_prefix_never_sees_the_message(
    redis_target: tuple[str, str], channel: str
) -> None:
    url, prefix = redis_target
    ours = RedisPubSub(url, prefix=prefix)
    other_run = RedisPubSub(url, prefix=prefix + "other:")
    await ours.start()
    await other_run.start()
    try:
        async with other_run.subscribe(channel) as theirs:
            await ours.publish(channel, b"ours")
            # Same publishing connection, so Redis delivers in order: had "ours" leaked to
            # the other prefix it would arrive before this sentinel.
            await other_run.publish(channel, b"sentinel")
            assert await next_message(theirs) == b"sentinel"
    finally:
        await ours.close()
        await other_run.close()


@pytest.mark.redis
async def test_dropped_redis_connection_ends_subscriptions_with_lost(
    redis_target: tuple[str, str], channel: str
) -> None:
    url, prefix = redis_target
    name = f"rp-test-{secrets.token_hex(4)}"
    pubsub = RedisPubSub(url, prefix=prefix, client_name=name)
    await pubsub.start()
    admin = redis.asyncio.Redis.from_url(url)
    try:
        async with pubsub.subscribe(channel) as subscription:
            clients = await admin.client_list()
            (victim,) = [c for c in clients if c.get("name") == name]
            await admin.client_kill_filter(_id=victim["id"])
            with pytest.raises(SubscriptionLost):
                await next_message(subscription)
        # A fresh subscription dials a new connection and works.
        async with pubsub.subscribe(channel) as again:
            await pubsub.publish(channel, b"back")
            assert await next_message(again) == b"back"
    finally:
        await admin.aclose()
        await pubsub.close()


async def test_ping_fails_before_start(make_pubsub: PubSubFactory) -> None:
    pubsub = make_pubsub()
    with pytest.raises(Exception, match="not started"):
        await pubsub.ping()
    await pubsub.start()
    await pubsub.ping()


def test_factory_picks_backend_from_settings() -> None:
    assert isinstance(create_pubsub(Settings(redis_url=None)), InProcessPubSub)
    assert isinstance(create_pubsub(Settings(redis_url="redis://127.0.0.1:6379/0")), RedisPubSub)


async def test_waiting_reader_is_woken_by_publish(make_pubsub: PubSubFactory, channel: str) -> None:
    pubsub = make_pubsub()
    await pubsub.start()
    got: list[bytes] = []
    async with pubsub.subscribe(channel) as subscription:

        async def read_one() -> None:
            got.append(await anext(subscription))

        reader = asyncio.create_task(read_one())
        await pubsub.publish(channel, b"wake")
        await wait_until(lambda: got == [b"wake"], what="reader woken")
        await reader
