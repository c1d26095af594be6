"""Rate limits: token buckets for bursts and fixed UTC-day windows for quotas.

Two backends share the `RateLimiter` protocol: `MemoryRateLimiter` for the embedded,
single-process mode and `RedisRateLimiter` (in `ratelimit_redis`) when several processes must
agree on one budget. Both compute the same `Decision`, so callers and tests treat them alike.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

if TYPE_CHECKING:
    import redis.asyncio

    from relayport.settings import Settings

DAY_S = 86_400

# Float noise (0.1 s * 10 tokens/s == 0.9999999999999432 tokens) must not refuse a hit that is
# due, nor show one token fewer than the caller expects; both backends use the same tolerance.
TOKEN_EPSILON = 1e-9


class Decision(NamedTuple):
    """The outcome of one hit: whether it may proceed and what to tell the client.

    A NamedTuple, not a frozen dataclass: every request makes one per limit it checks, and a
    frozen dataclass's __init__ (object.__setattr__ per field) cost ~2 µs each."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` of an allowed hit, as the ASGI header pairs the response carries."""
        return [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(max(0, self.remaining)).encode()),
            (b"ratelimit-reset", str(_ceil_s(self.reset_s)).encode()),
        ]

    def headers(self) -> dict[str, str]:
        """IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers), plus Retry-After
        when refused."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(_ceil_s(self.reset_s)),
        }
        if not self.allowed:
            # "Retry-After: 0" invites an immediate retry that would be refused again.
            headers["Retry-After"] = str(max(1, _ceil_s(self.retry_after_s)))
        return headers


def _ceil_s(seconds: float) -> int:
    # Clients must not come back early, so round up; the tolerance keeps 2.0000000001 at 2.
    return max(0, math.ceil(seconds - 1e-6))


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit for `RateLimiter.check`: a token bucket (`rate`, `burst`) or a UTC-day quota
    (`limit`). Build them with `Limit.bucket` and `Limit.daily_quota`."""

    key: str
    kind: Literal["bucket", "quota"]
    rate: float = 0.0
    burst: int = 0
    limit: int = 0
    cost: int = 1

    @classmethod
    def bucket(cls, key: str, *, rate: float, burst: int, cost: int = 1) -> Limit:
        """The bucket `hit(key, rate=rate, burst=burst, cost=cost)` uses."""
        return cls(key, "bucket", rate=rate, burst=burst, cost=cost)

    @classmethod
    def daily_quota(cls, key: str, *, limit: int, cost: int = 1) -> Limit:
        """The window `quota(key, limit=limit, cost=cost)` uses."""
        return cls(key, "quota", limit=limit, cost=cost)

    def __post_init__(self) -> None:
        # Validated once here, so `check()` on the request path trusts what it is given.
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for arguments `hit()` or `quota()` would reject."""
        if self.kind == "bucket":
            validate_hit(self.rate, self.burst, self.cost)
        elif self.kind == "quota":
            validate_quota(self.limit, "day", self.cost)
        else:
            raise ValueError(f"unknown limit kind {self.kind!r}")


class RateLimiter(Protocol):
    async def hit(self, key: str, *, rate: float, burst: int, cost: int = 1) -> Decision:
        """Take `cost` tokens from the bucket `key` (capacity `burst`, refilling `rate` tokens
        per second). A refused hit takes nothing."""
        ...

    async def quota(
        self, key: str, *, limit: int, period: Literal["day"] = "day", cost: int = 1
    ) -> Decision:
        """Count `cost` against `key`'s `limit` for the current UTC day. A refused request does
        not count."""
        ...

    async def check(self, limits: Sequence[Limit]) -> list[Decision]:
        """Evaluate every limit atomically, all or nothing: if all allow, all are consumed; if
        any refuses, nothing is. Decisions come back in input order; refused ones carry their
        Retry-After, the others report the `remaining` they would have left.

        A key listed twice sees the earlier entry's tentative consumption, as consecutive
        `hit()`/`quota()` calls would.
        """
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the backend cannot answer (for readiness probes)."""
        ...


def validate_hit(rate: float, burst: int, cost: int) -> None:
    # A NaN or infinite rate would poison the stored state; a cost above the burst could never
    # be allowed and would answer with a Retry-After that lies, so both are caller bugs.
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive finite number, got {rate!r}")
    if burst < 1:
        raise ValueError(f"burst must be at least 1, got {burst!r}")
    if not 1 <= cost <= burst:
        raise ValueError(f"cost must be between 1 and burst ({burst}), got {cost!r}")


def validate_quota(limit: int, period: str, cost: int) -> None:
    if period != "day":
        raise ValueError(f"unsupported quota period {period!r} (only 'day')")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit!r}")
    if not 1 <= cost <= limit:
        raise ValueError(f"cost must be between 1 and limit ({limit}), got {cost!r}")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    full_at: float


@dataclass(slots=True)
class _Window:
    day: int
    used: int


class MemoryRateLimiter:
    """In-process limiter for the embedded mode; state is lost on restart, which only ever
    hands out a fresh budget.

    Nothing here awaits, so each call is atomic on the event loop without a lock.

    Memory stays within `max_keys` buckets plus `max_keys` windows: the cap is enforced on
    every insert, while dropping refilled buckets (and past days' windows) is a sweep that runs
    at most once per `sweep_interval_s` of the monotonic clock (or once per new UTC day).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_keys: int = 100_000,
        sweep_interval_s: float = 1.0,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        if not (math.isfinite(sweep_interval_s) and sweep_interval_s >= 0):
            raise ValueError("sweep_interval_s must be a non-negative finite number")
        # Buckets measure elapsed time, which must not jump with NTP; quotas follow the UTC
        # calendar, which only the wall clock knows.
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._sweep_interval_s = sweep_interval_s
        self._next_sweep = -math.inf
        self._swept_day: int | None = None

    @property
    def tracked_keys(self) -> int:
        """Buckets and quota windows held in memory."""
        return len(self._buckets) + len(self._windows)

    async def hit(self, key: str, *, rate: float, burst: int, cost: int = 1) -> Decision:
        validate_hit(rate, burst, cost)
        now = self._clock()
        tokens = self._tokens(key, rate, burst, now)
        allowed = tokens + TOKEN_EPSILON >= cost
        if allowed:
            tokens = max(0.0, tokens - cost)
            self._store_bucket(key, tokens, rate, burst, now)
        # A refused hit leaves the stored state as it was: refilling it later from the old
        # timestamp gives the same tokens as storing the refilled value now.
        return _bucket_decision(allowed, tokens, rate, burst, cost)

    async def quota(
        self, key: str, *, limit: int, period: Literal["day"] = "day", cost: int = 1
    ) -> Decision:
        validate_quota(limit, period, cost)
        now = self._wall_clock()
        day = math.floor(now / DAY_S)
        used = self._used(key, day)
        allowed = used + cost <= limit
        if allowed:
            used += cost
            self._store_window(key, day, used)
        return _quota_decision(allowed, used, limit, (day + 1) * DAY_S - now)

    async def check(self, limits: Sequence[Limit]) -> list[Decision]:
        if not limits:
            return []
        now = self._clock()
        wall = self._wall_clock()
        day = math.floor(wall / DAY_S)
        day_reset_s = (day + 1) * DAY_S - wall
        # Tentative state per key, so a key listed twice sees its earlier entry's consumption;
        # nothing touches the stored state until every limit has allowed.
        tokens_of: dict[str, float] = {}
        used_of: dict[str, int] = {}
        writes: list[tuple[Limit, float, int]] = []
        decisions: list[Decision] = []
        all_allowed = True
        for limit in limits:
            key, cost = limit.key, limit.cost
            if limit.kind == "bucket":
                rate, burst = limit.rate, limit.burst
                pending = tokens_of.get(key)
                if pending is None:
                    tokens = self._tokens(key, rate, burst, now)
                else:
                    tokens = min(float(burst), pending)
                allowed = tokens + TOKEN_EPSILON >= cost
                if allowed:
                    tokens = tokens_of[key] = max(0.0, tokens - cost)
                    writes.append((limit, tokens, 0))
                decisions.append(_bucket_decision(allowed, tokens, rate, burst, cost))
            else:
                pending_used = used_of.get(key)
                used = self._used(key, day) if pending_used is None else pending_used
                allowed = used + cost <= limit.limit
                if allowed:
                    used = used_of[key] = used + cost
                    writes.append((limit, 0.0, used))
                decisions.append(_quota_decision(allowed, used, limit.limit, day_reset_s))
            all_allowed = all_allowed and allowed
        if all_allowed:
            for limit, tokens, used in writes:
                if limit.kind == "bucket":
                    self._store_bucket(limit.key, tokens, limit.rate, limit.burst, now)
                else:
                    self._store_window(limit.key, day, used)
        return decisions

    def _tokens(self, key: str, rate: float, burst: int, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(burst)
        # max(0, …) so a clock that steps back (a fake one in tests) never drains a bucket.
        elapsed = max(0.0, now - bucket.updated)
        return min(float(burst), bucket.tokens + elapsed * rate)

    def _store_bucket(self, key: str, tokens: float, rate: float, burst: int, now: float) -> None:
        buckets = self._buckets
        full_at = now + (burst - tokens) / rate
        bucket = buckets.get(key)
        if bucket is None:
            buckets[key] = _Bucket(tokens, now, full_at)
            # Past the cap, dropping a bucket that is still refilling forgives its debt; that
            # is the price of bounded memory under a flood of distinct keys, and the least
            # recently used bucket is the one most likely to be nearly full anyway.
            if len(buckets) > self._max_keys:
                buckets.popitem(last=False)
        else:
            bucket.tokens, bucket.updated, bucket.full_at = tokens, now, full_at
            buckets.move_to_end(key)
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_interval_s
            self._evict_buckets(now)

    def _used(self, key: str, day: int) -> int:
        window = self._windows.get(key)
        return window.used if window is not None and window.day == day else 0

    def _store_window(self, key: str, day: int, used: int) -> None:
        windows = self._windows
        window = windows.get(key)
        if window is None:
            windows[key] = _Window(day, used)
            if len(windows) > self._max_keys:
                windows.popitem(last=False)
        else:
            window.day, window.used = day, used
            windows.move_to_end(key)
        # Only a new day can make a window stale.
        if self._swept_day is None or day > self._swept_day:
            self._swept_day = day
            self._evict_windows(day)

    async def close(self) -> None:
        self._buckets.clear()
        self._windows.clear()

    async def ping(self) -> None:
        return None

    def _evict_buckets(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket, so dropping it loses nothing.
        # Looking only at the least recently used end keeps this amortised O(1) per hit.
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest.full_at > now:
                break
            buckets.popitem(last=False)

    def _evict_windows(self, day: int) -> None:
        windows = self._windows
        while windows and next(iter(windows.values())).day < day:
            windows.popitem(last=False)


def _bucket_decision(allowed: bool, tokens: float, rate: float, burst: int, cost: int) -> Decision:
    """`tokens` is what the bucket holds after the hit (before it, when refused)."""
    return Decision(
        allowed=allowed,
        limit=burst,
        remaining=math.floor(tokens + TOKEN_EPSILON),
        reset_s=max(0.0, (burst - tokens) / rate),
        retry_after_s=0.0 if allowed else (cost - tokens) / rate,
    )


def _quota_decision(allowed: bool, used: int, limit: int, reset_s: float) -> Decision:
    """`used` counts this request when allowed."""
    return Decision(
        allowed=allowed,
        limit=limit,
        remaining=max(0, limit - used),
        reset_s=reset_s,
        retry_after_s=0.0 if allowed else reset_s,
    )


def create_rate_limiter(
    settings: Settings, redis_client: redis.asyncio.Redis | None = None
) -> RateLimiter:
    """The limiter the settings ask for: in-process without `redis_url`, else Redis.

    A given `redis_client` is shared (the caller closes it); without one, the limiter opens
    its own from `settings.redis_url` and closes it in `close()`.
    """
    if settings.redis_url is None:
        return MemoryRateLimiter()
    # Imported here because ratelimit_redis imports this module's types.
    from relayport.core.ratelimit_redis import RedisRateLimiter

    if redis_client is not None:
        return RedisRateLimiter(redis_client)
    import redis.asyncio

    return RedisRateLimiter(redis.asyncio.Redis.from_url(settings.redis_url), owns_client=True)
