"""Redis rate limiter: one atomic Lua script per call, shared by every process.

Time comes from Redis `TIME` inside the scripts, so instances whose clocks disagree still share
one timeline. Lua numbers are doubles and Redis truncates them to integers in replies, so the
scripts answer in whole tokens and milliseconds, rounded in the direction that keeps clients
from coming back early.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import redis.asyncio

from relayport.core.ratelimit import (
    TOKEN_EPSILON,
    Decision,
    Limit,
    validate_hit,
    validate_quota,
)

# KEYS[1]: bucket hash {tokens, ts}. ARGV: rate (tokens/s), burst, cost, epsilon.
# The hash keeps the token count as of `ts` (microseconds of Redis time); a missing hash is a
# full bucket, so the key expires once it would have refilled and idle keys cost nothing.
_HIT_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local eps = tonumber(ARGV[4])
-- PEXPIRE and integer replies overflow past this; ~3,000 years of refill is "never" anyway.
local max_ms = 1e14

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local tokens = burst
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
if state[1] and state[2] then
  -- A failover to a server whose clock is behind must not drain buckets.
  local elapsed = math.max(0, now - tonumber(state[2])) / 1000000
  tokens = math.min(burst, tonumber(state[1]) + elapsed * rate)
end

local allowed = 0
local retry_ms = 0
if tokens + eps >= cost then
  allowed = 1
  tokens = math.max(0, tokens - cost)
  -- %.17g and %d keep full precision; tostring() would round the timestamp to 14 digits.
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
             'ts', string.format('%d', now))
  local refill_ms = math.ceil((burst - tokens) / rate * 1000)
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.min(max_ms, refill_ms)))
else
  -- Refused hits write nothing: the stored state refills to the same value later.
  retry_ms = math.min(max_ms, math.ceil((cost - tokens) / rate * 1000))
end
local reset_ms = math.min(max_ms, math.ceil((burst - tokens) / rate * 1000))
return {allowed, math.floor(tokens + eps), retry_ms, reset_ms}
"""

# KEYS[1]: the day's counter. ARGV: limit, cost.
# Checking before INCRBY (rather than INCRBY then DECRBY) means a refused request writes
# nothing; the script is atomic either way. The key expires at the next UTC midnight of Redis
# time, which is what starts the new window, so the key name needs no date.
_QUOTA_LUA = """
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])

local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local midnight_ms = (math.floor(now_s / 86400) + 1) * 86400000

local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local allowed = 0
if used + cost <= limit then
  allowed = 1
  used = redis.call('INCRBY', KEYS[1], cost)
  -- Set on every write, not only the first, so a key that somehow lost its TTL heals.
  redis.call('PEXPIREAT', KEYS[1], midnight_ms)
end
return {allowed, math.max(0, limit - used), midnight_ms - now_ms}
"""


# KEYS[i]: the i-th limit's bucket hash or day counter, laid out as in _HIT_LUA/_QUOTA_LUA so
# check() and hit()/quota() share state. ARGV[1]: epsilon; then 4 per limit: kind ('b' or 'q'),
# rate (buckets; 0 for quotas), burst or limit, cost.
# Every limit is evaluated against one TIME; writes happen only if all allowed, so a refused
# call changes nothing. A key listed twice sees its earlier entry's tentative consumption.
# Reply: 4 integers per limit: allowed, remaining, retry_ms, reset_ms.
_CHECK_LUA = """
local eps = tonumber(ARGV[1])
local max_ms = 1e14

local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now = now_s * 1000000 + tonumber(t[2])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local midnight_ms = (math.floor(now_s / 86400) + 1) * 86400000

local pending = {}
local writes = {}
local reply = {}
local all_allowed = true
for i = 1, #KEYS do
  local key = KEYS[i]
  local base = 1 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local cap = tonumber(ARGV[base + 3])
  local cost = tonumber(ARGV[base + 4])
  local allowed = 0
  if kind == 'b' then
    local rate = tonumber(ARGV[base + 2])
    local tokens = pending[key]
    if tokens then
      tokens = math.min(cap, tokens)
    else
      tokens = cap
      local state = redis.call('HMGET', key, 'tokens', 'ts')
      if state[1] and state[2] then
        local elapsed = math.max(0, now - tonumber(state[2])) / 1000000
        tokens = math.min(cap, tonumber(state[1]) + elapsed * rate)
      end
    end
    local retry_ms = 0
    if tokens + eps >= cost then
      allowed = 1
      tokens = math.max(0, tokens - cost)
      pending[key] = tokens
      writes[#writes + 1] = {key, 'b', tokens, rate, cap}
    else
      retry_ms = math.min(max_ms, math.ceil((cost - tokens) / rate * 1000))
    end
    local reset_ms = math.min(max_ms, math.ceil((cap - tokens) / rate * 1000))
    reply[#reply + 1] = allowed
    reply[#reply + 1] = math.floor(tokens + eps)
    reply[#reply + 1] = retry_ms
    reply[#reply + 1] = reset_ms
  else
    local used = pending[key]
    if not used then
      used = tonumber(redis.call('GET', key) or '0')
    end
    local reset_ms = midnight_ms - now_ms
    local retry_ms = reset_ms
    if used + cost <= cap then
      allowed = 1
      retry_ms = 0
      used = used + cost
      pending[key] = used
      writes[#writes + 1] = {key, 'q', cost}
    end
    reply[#reply + 1] = allowed
    reply[#reply + 1] = math.max(0, cap - used)
    reply[#reply + 1] = retry_ms
    reply[#reply + 1] = reset_ms
  end
  if allowed == 0 then
    all_allowed = false
  end
end

if all_allowed then
  for _, w in ipairs(writes) do
    if w[2] == 'b' then
      local tokens, rate, burst = w[3], w[4], w[5]
      redis.call('HSET', w[1], 'tokens', string.format('%.17g', tokens),
                 'ts', string.format('%d', now))
      local refill_ms = math.ceil((burst - tokens) / rate * 1000)
      redis.call('PEXPIRE', w[1], math.max(1, math.min(max_ms, refill_ms)))
    else
      redis.call('INCRBY', w[1], w[3])
      redis.call('PEXPIREAT', w[1], midnight_ms)
    end
  end
end
return reply
"""


class RedisRateLimiter:
    """Rate limits shared by every process that talks to the same Redis."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        prefix: str = "relayport:rl:",
        *,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._prefix = prefix
        # A client handed in is usually shared with pub/sub and caches, so only close our own.
        self._owns_client = owns_client
        # register_script runs EVALSHA and reloads the script on NOSCRIPT (after a restart
        # or SCRIPT FLUSH), so the script body crosses the wire only when needed.
        self._hit_script = client.register_script(_HIT_LUA)
        self._quota_script = client.register_script(_QUOTA_LUA)
        self._check_script = client.register_script(_CHECK_LUA)

    async def hit(self, key: str, *, rate: float, burst: int, cost: int = 1) -> Decision:
        validate_hit(rate, burst, cost)
        # repr() is the shortest string that round-trips, so Lua sees exactly this double.
        reply = await self._hit_script(
            keys=[f"{self._prefix}b:{key}"],
            args=[repr(float(rate)), burst, cost, repr(TOKEN_EPSILON)],
        )
        allowed, remaining, retry_ms, reset_ms = _ints(reply, 4)
        return Decision(
            allowed=allowed == 1,
            limit=burst,
            remaining=remaining,
            reset_s=reset_ms / 1000,
            retry_after_s=retry_ms / 1000,
        )

    async def quota(
        self, key: str, *, limit: int, period: Literal["day"] = "day", cost: int = 1
    ) -> Decision:
        validate_quota(limit, period, cost)
        reply = await self._quota_script(keys=[f"{self._prefix}q:{key}"], args=[limit, cost])
        allowed, remaining, reset_ms = _ints(reply, 3)
        reset_s = reset_ms / 1000
        return Decision(
            allowed=allowed == 1,
            limit=limit,
            remaining=remaining,
            reset_s=reset_s,
            retry_after_s=0.0 if allowed == 1 else reset_s,
        )

    async def check(self, limits: Sequence[Limit]) -> list[Decision]:
        if not limits:
            return []
        prefix = self._prefix
        keys: list[str] = []
        args: list[str | int] = [repr(TOKEN_EPSILON)]
        for limit in limits:
            if limit.kind == "bucket":
                keys.append(f"{prefix}b:{limit.key}")
                args += ("b", repr(float(limit.rate)), limit.burst, limit.cost)
            else:
                keys.append(f"{prefix}q:{limit.key}")
                args += ("q", 0, limit.limit, limit.cost)
        # One EVALSHA for the whole list: one round trip, one TIME, one atomic decision.
        values = _ints(await self._check_script(keys=keys, args=args), 4 * len(limits))
        decisions: list[Decision] = []
        for i, limit in enumerate(limits):
            allowed, remaining, retry_ms, reset_ms = values[4 * i : 4 * i + 4]
            decisions.append(
                Decision(
                    allowed=allowed == 1,
                    limit=limit.burst if limit.kind == "bucket" else limit.limit,
                    remaining=remaining,
                    reset_s=reset_ms / 1000,
                    retry_after_s=retry_ms / 1000,
                )
            )
        return decisions

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def ping(self) -> None:
        await self._client.ping()


def _ints(reply: Any, n: int) -> list[int]:
    # Script replies are untyped; fail loudly rather than hand out a wrong decision.
    if not isinstance(reply, Sequence) or len(reply) != n:
        raise TypeError(f"unexpected rate limit script reply: {reply!r}")
    return [int(value) for value in reply]
