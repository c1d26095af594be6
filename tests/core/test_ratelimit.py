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
    Limit,
    MemoryRateLimiter,
    RateLimiter,
    create_rate_limiter,
)
from relayport.core.ratelimit_redis import _CHECK_LUA, MAX_IN_FLIGHT, RedisRateLimiter
from relayport.core.redis_pipe import ScriptPipe
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


# --- check: several limits, all or nothing ------------------------------------------------------


def _request_limits(cost: int = 1) -> list[Limit]:
    """The three limits an authenticated request takes (as in deps._limit)."""
    return [
        Limit.bucket("p:alice", rate=NEVER, burst=5, cost=cost),
        Limit.bucket("t:acme", rate=NEVER, burst=10, cost=cost),
        Limit.daily_quota("q:acme", limit=20, cost=cost),
    ]


def test_limit_helpers_build_buckets_and_quotas() -> None:
    assert Limit.bucket("k", rate=2.5, burst=4, cost=2) == Limit(
        "k", "bucket", rate=2.5, burst=4, cost=2
    )
    assert Limit.daily_quota("k", limit=9) == Limit("k", "quota", limit=9, cost=1)


async def test_check_consumes_every_limit_when_all_allow(backend: Backend) -> None:
    first = await backend.limiter.check(_request_limits(cost=2))
    second = await backend.limiter.check(_request_limits())

    assert [(d.allowed, d.remaining) for d in first] == [(True, 3), (True, 8), (True, 18)]
    assert [(d.allowed, d.remaining) for d in second] == [(True, 2), (True, 7), (True, 17)]
    assert all(d.retry_after_s == 0 for d in first + second)
    assert [d.limit for d in first] == [5, 10, 20]


async def test_check_consumes_nothing_when_one_bucket_refuses(backend: Backend) -> None:
    assert (await backend.limiter.hit("p:alice", rate=NEVER, burst=5, cost=5)).allowed

    refused = await backend.limiter.check(_request_limits())
    tenant = await backend.limiter.hit("t:acme", rate=NEVER, burst=10)
    quota = await backend.limiter.quota("q:acme", limit=20)

    assert [d.allowed for d in refused] == [False, True, True]
    assert refused[0].remaining == 0
    assert refused[0].retry_after_s > 0
    assert "Retry-After" in refused[0].headers()
    # The others report what they would have left, but nothing was taken from them.
    assert [(d.remaining, d.retry_after_s) for d in refused[1:]] == [(9, 0), (19, 0)]
    assert (tenant.allowed, tenant.remaining) == (True, 9)
    assert (quota.allowed, quota.remaining) == (True, 19)


async def test_check_consumes_nothing_when_the_quota_refuses(backend: Backend) -> None:
    assert (await backend.limiter.quota("q:acme", limit=20, cost=20)).allowed

    refused = await backend.limiter.check(_request_limits())
    again = await backend.limiter.check(_request_limits()[:2])

    assert [d.allowed for d in refused] == [True, True, False]
    assert refused[2].remaining == 0
    assert refused[2].retry_after_s == refused[2].reset_s > 0
    assert [(d.allowed, d.remaining) for d in again] == [(True, 4), (True, 9)]


async def test_check_reports_every_refusal(backend: Backend) -> None:
    await backend.limiter.hit("a", rate=NEVER, burst=1)
    await backend.limiter.quota("q", limit=1)

    decisions = await backend.limiter.check(
        [
            Limit.bucket("a", rate=NEVER, burst=1),
            Limit.bucket("b", rate=NEVER, burst=3),
            Limit.daily_quota("q", limit=1),
        ]
    )

    assert [d.allowed for d in decisions] == [False, True, False]
    assert (await backend.limiter.hit("b", rate=NEVER, burst=3)).remaining == 2


async def test_check_returns_decisions_in_input_order(backend: Backend) -> None:
    limits = [
        Limit.daily_quota("z", limit=7),
        Limit.bucket("y", rate=NEVER, burst=3),
        Limit.daily_quota("a", limit=2, cost=2),
        Limit.bucket("b", rate=NEVER, burst=9, cost=4),
    ]

    decisions = await backend.limiter.check(limits)

    assert [(d.limit, d.remaining) for d in decisions] == [(7, 6), (3, 2), (2, 0), (9, 5)]
    assert await backend.limiter.check([]) == []


async def test_check_shares_state_with_hit_and_quota(backend: Backend) -> None:
    await backend.limiter.hit("x", rate=NEVER, burst=5, cost=2)
    await backend.limiter.quota("x", limit=5, cost=3)

    checked = await backend.limiter.check(
        [Limit.bucket("x", rate=NEVER, burst=5), Limit.daily_quota("x", limit=5)]
    )
    hit = await backend.limiter.hit("x", rate=NEVER, burst=5)
    quota = await backend.limiter.quota("x", limit=5)

    assert [d.remaining for d in checked] == [2, 1]
    assert (hit.allowed, hit.remaining) == (True, 1)
    assert (quota.allowed, quota.remaining) == (True, 0)


async def test_check_sees_a_repeated_key_consumed_by_its_earlier_entry(backend: Backend) -> None:
    twice = [Limit.bucket("k", rate=NEVER, burst=3, cost=2)] * 2

    refused = await backend.limiter.check(twice)
    allowed = await backend.limiter.check([Limit.bucket("k", rate=NEVER, burst=3)] * 2)
    quotas = await backend.limiter.check([Limit.daily_quota("q", limit=3, cost=2)] * 2)

    assert [(d.allowed, d.remaining) for d in refused] == [(True, 1), (False, 1)]
    assert [(d.allowed, d.remaining) for d in allowed] == [(True, 2), (True, 1)]
    assert [(d.allowed, d.remaining) for d in quotas] == [(True, 1), (False, 1)]
    assert (await backend.limiter.quota("q", limit=3)).remaining == 2


@pytest.mark.parametrize(
    "build",
    [
        lambda: Limit.bucket("k", rate=0, burst=5),
        lambda: Limit.bucket("k", rate=math.nan, burst=5),
        lambda: Limit.bucket("k", rate=1, burst=0),
        lambda: Limit.bucket("k", rate=1, burst=5, cost=6),
        lambda: Limit.daily_quota("k", limit=0),
        lambda: Limit.daily_quota("k", limit=3, cost=4),
        lambda: Limit("k", cast(Any, "hourly"), limit=3),
    ],
)
def test_impossible_limits_cannot_be_built(build: Any) -> None:
    """Limits are validated when built, so `check()` on the request path never sees one."""
    with pytest.raises(ValueError, match=r"rate|burst|cost|limit|kind"):
        build()


async def test_concurrent_checks_are_atomic(backend: Backend) -> None:
    decisions = await asyncio.gather(*(backend.limiter.check(_request_limits()) for _ in range(40)))

    allowed = [ds for ds in decisions if all(d.allowed for d in ds)]
    assert len(allowed) == 5
    assert sorted(ds[0].remaining for ds in allowed) == [0, 1, 2, 3, 4]
    assert (await backend.limiter.hit("t:acme", rate=NEVER, burst=10)).remaining == 4
    assert (await backend.limiter.quota("q:acme", limit=20)).remaining == 14


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


async def test_two_redis_instances_check_all_or_nothing_under_concurrency(
    redis_client: Redis, prefix: str
) -> None:
    other_process = await _connect()
    try:
        limiters = [RedisRateLimiter(redis_client, prefix), RedisRateLimiter(other_process, prefix)]
        limits = [
            Limit.bucket("p:alice", rate=NEVER, burst=50),
            Limit.bucket("t:acme", rate=NEVER, burst=1000),
            Limit.daily_quota("q:acme", limit=10**6),
        ]

        results = await asyncio.gather(*(limiters[i % 2].check(limits) for i in range(200)))

        allowed = [ds for ds in results if ds[0].allowed]
        assert len(allowed) == 50
        assert all(ds[1].allowed and ds[2].allowed for ds in results), "only the principal refuses"
        assert sorted(ds[0].remaining for ds in allowed) == list(range(50))
        assert sorted(ds[1].remaining for ds in allowed) == list(range(950, 1000))
        assert await redis_client.get(f"{prefix}q:q:acme") == b"50"
        tenant = await limiters[0].hit("t:acme", rate=NEVER, burst=1000)
        assert tenant.remaining == 949
    finally:
        await other_process.aclose()


async def test_redis_check_is_one_round_trip(redis_client: Redis, prefix: str) -> None:
    """One EVALSHA on the limiter's own connection, and nothing through the shared client."""
    limiter = RedisRateLimiter(redis_client, prefix)
    await limiter.check(_request_limits())  # loads the script if Redis does not know it yet
    before = await _evalsha_calls(redis_client)
    shared: list[Any] = []
    execute_command: Any = redis_client.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        shared.append(args[0])
        return await execute_command(*args, **options)

    redis_client.execute_command = counting  # type: ignore[method-assign]
    try:
        decisions = await limiter.check(_request_limits())
    finally:
        del redis_client.execute_command

    assert shared == []
    # Other clients of this Redis may run scripts too, so one or more; never zero.
    assert await _evalsha_calls(redis_client) > before
    assert [d.remaining for d in decisions] == [3, 8, 18]
    await limiter.close()


async def _evalsha_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


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


async def test_memory_limiter_sweeps_refilled_buckets_at_most_once_per_interval() -> None:
    clock = FakeClock(start=0.0)
    limiter = MemoryRateLimiter(clock=clock, sweep_interval_s=10)

    await limiter.hit("a", rate=10, burst=5)  # sweeps, next sweep due at 10 s
    clock.advance(1)  # "a" has refilled, but no sweep is due yet
    await limiter.hit("b", rate=10, burst=5)
    assert limiter.tracked_keys == 2
    assert (await limiter.hit("a", rate=10, burst=5)).remaining == 4, "a refilled bucket is full"
    clock.advance(10)
    await limiter.check([Limit.bucket("c", rate=10, burst=5)])

    assert limiter.tracked_keys == 1


async def test_memory_limiter_check_stays_within_max_keys() -> None:
    limiter = MemoryRateLimiter(clock=FakeClock(start=0.0), max_keys=10, sweep_interval_s=1e9)

    for i in range(100):
        limits = [Limit.bucket(f"b-{i}", rate=NEVER, burst=5), Limit.daily_quota(f"q-{i}", limit=5)]
        assert all(d.allowed for d in await limiter.check(limits))

    assert limiter.tracked_keys == 20


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


async def test_concurrent_redis_checks_share_one_script_run_with_sequential_answers(
    redis_client: Redis, prefix: str
) -> None:
    """Checks made in one loop turn go out as one EVALSHA, yet each call keeps its own
    all-or-nothing answer: a refused call in the middle of the batch spends nothing.
    (The batch sender is wrapped to count its runs; the real one still answers.)"""
    limiter = RedisRateLimiter(redis_client, prefix=prefix)
    runs = _count_script_runs(limiter)
    small = [Limit.bucket("small", rate=NEVER, burst=1)]
    big = [Limit.bucket("big", rate=NEVER, burst=3)]
    both = [*big, *small]
    results = await asyncio.gather(
        limiter.check(small), limiter.check(both), limiter.check(big), limiter.check(big)
    )
    assert runs == [4]
    assert [[d.allowed for d in ds] for ds in results] == [
        [True],  # takes the only "small" token
        [True, False],  # refused by "small": "big" is not spent either
        [True],
        [True],
    ]
    assert [ds[0].remaining for ds in results[2:]] == [2, 1]
    await limiter.close()


async def test_checks_made_while_script_calls_are_out_wait_and_go_together(
    redis_client: Redis, prefix: str
) -> None:
    """Up to MAX_IN_FLIGHT batches are out at once; checks made meanwhile queue and then
    share the next one, in the order they were made. (The script call is wrapped to hold
    the first runs until the other checks have queued; the real one still answers.)"""
    limiter = RedisRateLimiter(redis_client, prefix=prefix)
    release = asyncio.Event()
    runs = _count_script_runs(limiter, hold=MAX_IN_FLIGHT, until=release)
    bucket = [Limit.bucket("seq", rate=NEVER, burst=10)]
    out = []
    for _ in range(MAX_IN_FLIGHT):
        out.append(asyncio.create_task(limiter.check(bucket)))
        await asyncio.sleep(0.01)  # this call is out, waiting
    later = [asyncio.create_task(limiter.check(bucket)) for _ in range(5)]
    for _ in range(3):
        await asyncio.sleep(0.01)  # several loop turns pass while the first ones are out
    assert runs == [1] * MAX_IN_FLIGHT
    release.set()
    results = await asyncio.gather(*out, *later)
    assert runs == [1] * MAX_IN_FLIGHT + [5]
    assert [ds[0].remaining for ds in results] == list(range(9, 9 - MAX_IN_FLIGHT - 5, -1))
    await limiter.close()


async def test_a_redis_failure_reaches_every_batched_caller(
    redis_client: Redis, prefix: str
) -> None:
    """The script call is replaced by one that fails as a lost connection would."""
    limiter = RedisRateLimiter(redis_client, prefix=prefix)

    async def failing(packed: bytes) -> Any:
        raise RedisError("connection refused")

    limiter._check.call = failing  # type: ignore[method-assign]
    results = await asyncio.gather(
        *(limiter.check([Limit.bucket(f"k{i}", rate=1, burst=1)]) for i in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(r, RedisError) for r in results)
    await limiter.close()


async def test_a_killed_connection_fails_the_check_in_flight_and_the_next_one_reconnects(
    redis_client: Redis, prefix: str
) -> None:
    """Redis drops the limiter's own connection (CLIENT KILL): the check fails with a Redis
    error (a 503 for the request that made it), and the next check opens a new connection
    and answers from the same bucket."""
    limiter = RedisRateLimiter(redis_client, prefix=prefix)
    bucket = [Limit.bucket("kill", rate=NEVER, burst=10)]
    assert (await limiter.check(bucket))[0].remaining == 9
    link = limiter._check._link
    assert link is not None
    host, port = link.conn._writer.get_extra_info("sockname")[:2]
    assert await redis_client.client_kill_filter(_type=None, addr=f"{host}:{port}") == 1
    with pytest.raises(RedisError):
        await limiter.check(bucket)
    assert (await limiter.check(bucket))[0].remaining == 8
    await limiter.close()


def _count_script_runs(
    limiter: RedisRateLimiter, *, hold: int = 0, until: asyncio.Event | None = None
) -> list[int]:
    """Wrap the limiter's script call: the list gets the number of check() calls of each run
    (the real script still answers); the first `hold` runs wait for `until`."""
    runs: list[int] = []
    real_send = limiter._send

    async def send(batch: Any) -> None:
        runs.append(len(batch))
        if until is not None and len(runs) <= hold:
            await until.wait()
        await real_send(batch)

    limiter._send = send  # type: ignore[method-assign]
    return runs


async def test_one_script_run_answers_as_the_same_checks_made_one_at_a_time(
    redis_client: Redis, prefix: str
) -> None:
    """A run of many calls that share limits (each distinct limit sent once, each key read and
    written once per run) gives every call the answer, and leaves Redis the state, that the
    same calls made one after the other give: refusals in the middle, a key listed twice in
    a call, a quota running out, buckets and quotas on one key name."""
    ip = Limit.bucket("ip", rate=NEVER, burst=7)
    source = Limit.bucket("src", rate=NEVER, burst=5)
    tenant = Limit.bucket("ten", rate=NEVER, burst=100)
    quota = Limit.daily_quota("day", limit=6)
    double = Limit.bucket("dbl", rate=NEVER, burst=9)
    pricey = Limit.bucket("src", rate=NEVER, burst=5, cost=3)  # same key as `source`
    calls = [
        [ip, source, tenant, quota],
        [ip, double, double],
        [ip, source, tenant, quota],
        [pricey, quota],
        [ip, source, tenant, quota],
        [Limit.bucket("ip", rate=NEVER, burst=7), source, tenant, quota],  # equal, not same
        [double, double, quota],
        [ip, source, tenant, quota],
        [ip, source, tenant, quota],
        [quota],
        [ip, double, double],
    ]
    batched = RedisRateLimiter(redis_client, prefix=prefix + "a:")
    runs = _count_script_runs(batched)
    together = await asyncio.gather(*(batched.check(c) for c in calls))
    assert runs == [len(calls)]
    alone = RedisRateLimiter(redis_client, prefix=prefix + "b:")
    one_by_one = [await alone.check(c) for c in calls]

    def answers(results: list[list[Decision]]) -> list[list[tuple[bool, int, int]]]:
        return [[(d.allowed, d.remaining, d.limit) for d in ds] for ds in results]

    assert answers(together) == answers(one_by_one)
    assert any(not d.allowed for ds in together for d in ds), "the case needs refusals"
    for name in ("b:ip", "b:src", "b:ten", "b:dbl"):
        a = await redis_client.hget(f"{prefix}a:{name}", "tokens")
        b = await redis_client.hget(f"{prefix}b:{name}", "tokens")
        # One by one, a little time passes between calls: NEVER refills a hair meanwhile.
        assert a is not None
        assert b is not None
        assert float(a) == pytest.approx(float(b), abs=1e-6), name
        assert await redis_client.pttl(f"{prefix}a:{name}") > 0
    assert await redis_client.get(f"{prefix}a:q:day") == await redis_client.get(f"{prefix}b:q:day")
    assert await redis_client.get(f"{prefix}a:q:day") == b"5"  # refused calls spend none
    await batched.close()
    await alone.close()


async def test_redis_check_loads_its_script_when_redis_does_not_know_it(
    redis_client: Redis, prefix: str
) -> None:
    """After a Redis restart or SCRIPT FLUSH the script's hash is unknown (NOSCRIPT): the
    limiter loads it and answers."""
    limiter = RedisRateLimiter(redis_client, prefix=prefix)
    # A variant of the script Redis has never seen (flushing every script would reach other
    # clients of this Redis).
    limiter._check = ScriptPipe(redis_client, f"{_CHECK_LUA}\n-- {uuid.uuid4().hex}")
    assert await redis_client.script_exists(limiter._check.sha.decode()) == [False]
    (decision,) = await limiter.check([Limit.bucket("noscript", rate=NEVER, burst=2)])
    assert decision.allowed
    assert decision.remaining == 1
    assert await redis_client.script_exists(limiter._check.sha.decode()) == [True]
    await limiter.close()
