"""Rate limiter behaviour, run against every backend (in-process and a real Redis)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from relayport.core.ratelimit import (
    Decision,
    MemoryRateLimiter,
    RateLimiter,
    create_rate_limiter,
)
from relayport.core.ratelimit_redis import RedisRateLimiter
from relayport.settings import Settings

REDIS_URL = os.environ.get("RELAYPORT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NEVER = 1e-9  # tokens per second: no refill within a test
POLL_DEADLINE_S = 5.0
DAY_S = 86_400


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    name: str
    limiter: RateLimiter
    clock: FakeClock | None  # None: the backend runs on real (Redis) time

    def elapsed_since(self, start: float) -> float:
        return self.now() - start

    def now(self) -> float:
        return self.clock() if self.clock is not None else time.monotonic()

    async def tick(self) -> None:
        """Let a little time pass between two polls."""
        if self.clock is not None:
            self.clock.advance(0.005)
        else:
            await asyncio.sleep(0.005)


async def _connect() -> Redis:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        reason = f"Redis unreachable at {REDIS_URL}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return client


async def _delete_prefix(client: Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = await _connect()
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client: Redis) -> AsyncIterator[str]:
    prefix = f"rp-test-{uuid.uuid4().hex}:"
    yield prefix
    await _delete_prefix(redis_client, prefix)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    # Built inline rather than from the redis fixtures: an async fixture cannot pull other
    # async fixtures through request.getfixturevalue, and memory runs must not need Redis.
    if request.param == "memory":
        clock = FakeClock(start=1_000.0)
        memory = MemoryRateLimiter(clock=clock)
        yield Backend("memory", memory, clock)
        await memory.close()
        return
    client = await _connect()
    prefix = f"rp-test-{uuid.uuid4().hex}:"
    try:
        yield Backend("redis", RedisRateLimiter(client, prefix=prefix), None)
    finally:
        await _delete_prefix(client, prefix)
        await client.aclose()


async def _poll_until_allowed(backend: Backend, key: str, **hit: Any) -> Decision:
    deadline = time.monotonic() + POLL_DEADLINE_S
    while True:
        decision = await backend.limiter.hit(key, **hit)
        if decision.allowed:
            return decision
        if time.monotonic() > deadline:
            pytest.fail(f"{key} still refused after {POLL_DEADLINE_S}s: {decision}")
        await backend.tick()


def _seconds_to_utc_midnight() -> float:
    return DAY_S - time.time() % DAY_S


# --- token bucket -------------------------------------------------------------------------------


async def test_burst_is_allowed_then_refused(backend: Backend) -> None:
    decisions = [await backend.limiter.hit("k", rate=NEVER, burst=5) for _ in range(6)]

    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in decisions)
    assert all(d.retry_after_s == 0 for d in decisions[:5])
    assert decisions[5].retry_after_s > 0


async def test_refused_hit_reports_retry_after_of_cost_over_rate(backend: Backend) -> None:
    assert (await backend.limiter.hit("k", rate=0.5, burst=4, cost=4)).allowed

    refused = await backend.limiter.hit("k", rate=0.5, burst=4, cost=3)
    refused_one = await backend.limiter.hit("k", rate=0.5, burst=4, cost=1)

    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(3 / 0.5, abs=0.05)
    assert refused.reset_s == pytest.approx(4 / 0.5, abs=0.05)
    assert refused_one.retry_after_s == pytest.approx(1 / 0.5, abs=0.05)


async def test_tokens_refill_over_time(backend: Backend) -> None:
    start = backend.now()
    assert (await backend.limiter.hit("k", rate=1000, burst=100, cost=100)).allowed
    # 50 tokens at 1000/s take 0.05 s, far longer than one round trip.
    refused = await backend.limiter.hit("k", rate=1000, burst=100, cost=50)
    assert not refused.allowed
    assert 0 < refused.retry_after_s <= 0.05

    # Half a refill, so Redis still holds the key (it expires once full, after 0.1 s) and the
    # tokens must come from the refill arithmetic.
    refilled = await _poll_until_allowed(backend, "k", rate=1000, burst=100, cost=50)

    assert refilled.remaining < 50
    assert backend.elapsed_since(start) >= 0.045


async def test_memory_bucket_refills_at_exactly_its_rate() -> None:
    # From 100.0, advancing 0.1 s measures 0.09999999999999432 s.
    clock = FakeClock(start=100.0)
    limiter = MemoryRateLimiter(clock=clock)
    assert (await limiter.hit("k", rate=10, burst=5, cost=5)).allowed

    clock.advance(0.1)  # one token; float noise (0.0999999…) must not refuse it
    one = await limiter.hit("k", rate=10, burst=5)
    none_left = await limiter.hit("k", rate=10, burst=5)
    clock.advance(0.25)  # 2.5 tokens
    partial = await limiter.hit("k", rate=10, burst=5)
    clock.advance(60)
    full = await limiter.hit("k", rate=10, burst=5)

    assert one.allowed
    assert one.remaining == 0
    assert not none_left.allowed
    assert none_left.retry_after_s == pytest.approx(0.1)
    assert partial.allowed
    assert partial.remaining == 1
    assert partial.reset_s == pytest.approx(3.5 / 10)
    assert full.remaining == 4, "refill is capped at the burst"


async def test_refused_hits_do_not_drain(backend: Backend) -> None:
    assert (await backend.limiter.hit("k", rate=NEVER, burst=10, cost=8)).remaining == 2

    refused = [await backend.limiter.hit("k", rate=NEVER, burst=10, cost=5) for _ in range(5)]
    last = await backend.limiter.hit("k", rate=NEVER, burst=10, cost=2)

    assert not any(d.allowed for d in refused)
    assert all(d.remaining == 2 for d in refused)
    assert last.allowed
    assert last.remaining == 0


async def test_cost_above_one_takes_that_many_tokens(backend: Backend) -> None:
    first = await backend.limiter.hit("k", rate=1, burst=10, cost=4)
    second = await backend.limiter.hit("k", rate=1, burst=10, cost=4)
    refused = await backend.limiter.hit("k", rate=1, burst=10, cost=4)
    rest = await backend.limiter.hit("k", rate=1, burst=10, cost=2)

    assert (first.allowed, first.remaining) == (True, 6)
    assert (second.allowed, second.remaining) == (True, 2)
    assert (refused.allowed, refused.remaining) == (False, 2)
    assert refused.retry_after_s == pytest.approx((4 - 2) / 1, abs=0.05)
    assert (rest.allowed, rest.remaining) == (True, 0)


async def test_separate_keys_are_independent(backend: Backend) -> None:
    assert (await backend.limiter.hit("a", rate=NEVER, burst=2, cost=2)).allowed
    assert not (await backend.limiter.hit("a", rate=NEVER, burst=2)).allowed

    other = await backend.limiter.hit("b", rate=NEVER, burst=2)
    quota_same_name = await backend.limiter.quota("a", limit=1)

    assert (other.allowed, other.remaining) == (True, 1)
    assert quota_same_name.allowed, "buckets and quotas do not share state"


@pytest.mark.parametrize(
    ("rate", "burst", "cost"),
    [(0, 5, 1), (-1, 5, 1), (math.nan, 5, 1), (math.inf, 5, 1), (1, 0, 1), (1, 5, 0), (1, 5, 6)],
)
async def test_impossible_hits_are_rejected(
    backend: Backend, rate: float, burst: int, cost: int
) -> None:
    with pytest.raises(ValueError, match=r"rate|burst|cost"):
        await backend.limiter.hit("k", rate=rate, burst=burst, cost=cost)


# --- daily quota --------------------------------------------------------------------------------


async def test_quota_counts_and_refuses_at_the_limit(backend: Backend) -> None:
    decisions = [await backend.limiter.quota("k", limit=3) for _ in range(4)]
    expected_reset = _seconds_to_utc_midnight()

    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[3]
    assert 0 < refused.reset_s <= DAY_S
    # Modulo a day, so a run that straddles midnight still compares the right values.
    drift = abs(refused.reset_s - expected_reset)
    assert min(drift, DAY_S - drift) < 2
    assert refused.retry_after_s == refused.reset_s
    assert all(d.retry_after_s == 0 for d in decisions[:3])


async def test_refused_quota_request_does_not_count(backend: Backend) -> None:
    first = await backend.limiter.quota("k", limit=5, cost=3)
    refused = await backend.limiter.quota("k", limit=5, cost=3)
    rest = await backend.limiter.quota("k", limit=5, cost=2)
    over = await backend.limiter.quota("k", limit=5)

    assert (first.allowed, first.remaining) == (True, 2)
    assert (refused.allowed, refused.remaining) == (False, 2)
    assert (rest.allowed, rest.remaining) == (True, 0)
    assert not over.allowed


async def test_impossible_quotas_are_rejected(backend: Backend) -> None:
    with pytest.raises(ValueError, match="cost"):
        await backend.limiter.quota("k", limit=3, cost=4)
    with pytest.raises(ValueError, match="limit"):
        await backend.limiter.quota("k", limit=0)
    with pytest.raises(ValueError, match="period"):
        await backend.limiter.quota("k", limit=3, period=cast(Any, "week"))


async def test_memory_quota_resets_at_utc_midnight() -> None:
    before_midnight = dt.datetime(2026, 1, 1, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    wall = FakeClock(start=before_midnight)
    limiter = MemoryRateLimiter(wall_clock=wall)

    used = await limiter.quota("k", limit=1)
    refused = await limiter.quota("k", limit=1)
    wall.advance(1)
    next_day = await limiter.quota("k", limit=1)

    assert used.allowed
    assert used.reset_s == pytest.approx(1)
    assert not refused.allowed
    assert next_day.allowed
    assert next_day.reset_s == pytest.approx(DAY_S)


# --- headers ------------------------------------------------------------------------------------


def test_headers_of_an_allowed_decision_carry_no_retry_after() -> None:
    decision = Decision(allowed=True, limit=100, remaining=42, reset_s=1.2, retry_after_s=0)

    assert decision.headers() == {
        "RateLimit-Limit": "100",
        "RateLimit-Remaining": "42",
        "RateLimit-Reset": "2",
    }


@pytest.mark.parametrize(("retry_after_s", "header"), [(0.2, "1"), (0.0, "1"), (2.5, "3")])
def test_headers_of_a_refused_decision_round_retry_after_up_to_at_least_one_second(
    retry_after_s: float, header: str
) -> None:
    decision = Decision(
        allowed=False, limit=10, remaining=0, reset_s=3.0, retry_after_s=retry_after_s
    )

    assert decision.headers() == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "3",
        "Retry-After": header,
    }


async def test_headers_of_a_refused_hit(backend: Backend) -> None:
    await backend.limiter.hit("k", rate=0.5, burst=2, cost=2)

    headers = (await backend.limiter.hit("k", rate=0.5, burst=2)).headers()

    assert headers == {
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "4",
        "Retry-After": "2",
    }


# --- Redis specifics ----------------------------------------------------------------------------


async def test_two_redis_instances_share_one_bucket_under_concurrency(
    redis_client: Redis, prefix: str
) -> None:
    other_process = await _connect()
    try:
        limiters = [RedisRateLimiter(redis_client, prefix), RedisRateLimiter(other_process, prefix)]

        decisions = await asyncio.gather(
            *(limiters[i % 2].hit("shared", rate=NEVER, burst=50) for i in range(200))
        )

        assert sum(d.allowed for d in decisions) == 50
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))
    finally:
        await other_process.aclose()


async def test_redis_bucket_key_vanishes_once_refilled(redis_client: Redis, prefix: str) -> None:
    limiter = RedisRateLimiter(redis_client, prefix)
    await limiter.hit("idle", rate=100, burst=10, cost=5)
    key = f"{prefix}b:idle"

    ttl_ms = await redis_client.pttl(key)
    assert 0 < ttl_ms <= 50, "expires after the 5 tokens refill at 100/s"

    deadline = time.monotonic() + POLL_DEADLINE_S
    while await redis_client.exists(key):
        assert time.monotonic() < deadline, f"{key} outlived its refill time"
        await asyncio.sleep(0.01)
    assert (await limiter.hit("idle", rate=100, burst=10)).remaining == 9


async def test_redis_quota_key_expires_at_next_utc_midnight(
    redis_client: Redis, prefix: str
) -> None:
    decision = await RedisRateLimiter(redis_client, prefix).quota("daily", limit=10)

    ttl_ms = await redis_client.pttl(f"{prefix}q:daily")

    assert ttl_ms == pytest.approx(decision.reset_s * 1000, abs=1000)


# --- memory bounds and the factory --------------------------------------------------------------


async def test_memory_limiter_forgets_buckets_once_they_have_refilled() -> None:
    clock = FakeClock(start=0.0)
    limiter = MemoryRateLimiter(clock=clock)

    await limiter.hit("a", rate=10, burst=5)
    clock.advance(0.05)  # "a" needs 0.1 s to refill
    await limiter.hit("b", rate=10, burst=5)
    assert limiter.tracked_keys == 2
    clock.advance(1)
    await limiter.hit("c", rate=10, burst=5)

    assert limiter.tracked_keys == 1
    assert (await limiter.hit("a", rate=10, burst=5)).remaining == 4


async def test_memory_limiter_stays_within_max_keys() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(start=0.0), max_keys=100)

    for i in range(1_000):
        await limiter.hit(f"bucket-{i}", rate=NEVER, burst=5)
        await limiter.quota(f"quota-{i}", limit=5)

    assert limiter.tracked_keys == 200
    assert not (await limiter.hit("bucket-999", rate=NEVER, burst=5, cost=5)).allowed, (
        "the most recently used bucket is kept"
    )


async def test_create_rate_limiter_uses_memory_without_redis_url() -> None:
    limiter = create_rate_limiter(Settings(_env_file=None, redis_url=None), None)

    assert isinstance(limiter, MemoryRateLimiter)
    await limiter.ping()
    await limiter.close()


async def test_create_rate_limiter_uses_redis_and_leaves_a_shared_client_open(
    redis_client: Redis, prefix: str
) -> None:
    settings = Settings(_env_file=None, redis_url=REDIS_URL)

    shared = create_rate_limiter(settings, redis_client)
    await shared.ping()
    await shared.close()
    own = create_rate_limiter(settings, None)
    await own.ping()
    await own.close()

    assert isinstance(shared, RedisRateLimiter)
    assert isinstance(own, RedisRateLimiter)
    assert await redis_client.ping(), "closing the limiter must not close a client it was given"
