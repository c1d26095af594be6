"""Redis rate limiter: one atomic Lua script per call, shared by every process.

Time comes from Redis `TIME` inside the scripts, so instances whose clocks disagree still share
one timeline. Lua numbers are doubles and Redis truncates them to integers in replies, so the
scripts answer in whole tokens and milliseconds, rounded in the direction that keeps clients
from coming back early.
"""

from __future__ import annotations

import asyncio
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
from relayport.core.redis_pipe import ScriptPipe, bulk

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


# A batch of check() calls, evaluated one after the other as if each were its own script call.
# The batch names each distinct limit once and each call by the "shape" (list of limits) it
# checks, since concurrent requests mostly check the same few limits (one client address, one
# source, one tenant); and each key is read at most once and written at most once per run.
# KEYS[u]: the u-th distinct limit's bucket hash or day counter, laid out as in _HIT_LUA and
# _QUOTA_LUA so check() and hit()/quota() share state (a key may appear under several limits).
# ARGV[1]: epsilon; ARGV[2]: U, the number of distinct limits; then 4 per limit: kind ('b' or
# 'q'), rate (buckets; 0 for quotas), burst or limit, cost; then S, the number of shapes, and
# per shape its length and its limits' numbers (1-based); then G, the number of calls, and the
# shape number of each call.
# Within a call every limit is evaluated against one TIME and its consumption is kept only if
# all allowed, so a refused call changes nothing; a key listed twice in a call sees its earlier
# entry's tentative consumption; a later call sees what earlier calls consumed. Redis gets the
# final value of each key consumed from, once, at the end: what writing after every call
# would have left (all of it is one atomic script run).
# Reply: 4 integers per limit of each call, in order: allowed, remaining, retry_ms, reset_ms.
_CHECK_LUA = """
local eps = tonumber(ARGV[1])
local nlimits = tonumber(ARGV[2])
local max_ms = 1e14

local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now = now_s * 1000000 + tonumber(t[2])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local midnight_ms = (math.floor(now_s / 86400) + 1) * 86400000

local kind, rate, cap, cost = {}, {}, {}, {}
for u = 1, nlimits do
  local base = 2 + (u - 1) * 4
  kind[u] = ARGV[base + 1]
  rate[u] = tonumber(ARGV[base + 2])
  cap[u] = tonumber(ARGV[base + 3])
  cost[u] = tonumber(ARGV[base + 4])
end
local pos = 3 + nlimits * 4
local shapes = {}
for s = 1, tonumber(ARGV[pos]) do
  pos = pos + 1
  local shape = {}
  for j = 1, tonumber(ARGV[pos]) do
    shape[j] = tonumber(ARGV[pos + j])
  end
  pos = pos + #shape
  shapes[s] = shape
end
pos = pos + 1
local calls = tonumber(ARGV[pos])

-- A bucket's state as Redis would hold it: {tokens, ts}, or false for no hash (a full bucket).
-- A quota's: the day's count so far. nil: not read yet.
local state = {}
-- Keys consumed from, in first-consumed order, with what to write at the end.
local dirty = {}
local order = {}

local reply = {}
for c = 1, calls do
local shape = shapes[tonumber(ARGV[pos + c])]
local pending = {}
local writes = {}
local all_allowed = true
for j = 1, #shape do
  local u = shape[j]
  local key = KEYS[u]
  local limit_cap = cap[u]
  local limit_cost = cost[u]
  local allowed = 0
  if kind[u] == 'b' then
    local limit_rate = rate[u]
    local tokens = pending[key]
    if tokens then
      tokens = math.min(limit_cap, tokens)
    else
      local held = state[key]
      if held == nil then
        held = false
        local stored = redis.call('HMGET', key, 'tokens', 'ts')
        if stored[1] and stored[2] then
          held = {tonumber(stored[1]), tonumber(stored[2])}
        end
        state[key] = held
      end
      tokens = limit_cap
      if held then
        -- A failover to a server whose clock is behind must not drain buckets.
        local elapsed = math.max(0, now - held[2]) / 1000000
        tokens = math.min(limit_cap, held[1] + elapsed * limit_rate)
      end
    end
    local retry_ms = 0
    if tokens + eps >= limit_cost then
      allowed = 1
      tokens = math.max(0, tokens - limit_cost)
      pending[key] = tokens
      writes[#writes + 1] = {key, 'b', tokens, limit_rate, limit_cap}
    else
      retry_ms = math.min(max_ms, math.ceil((limit_cost - tokens) / limit_rate * 1000))
    end
    local reset_ms = math.min(max_ms, math.ceil((limit_cap - tokens) / limit_rate * 1000))
    reply[#reply + 1] = allowed
    reply[#reply + 1] = math.floor(tokens + eps)
    reply[#reply + 1] = retry_ms
    reply[#reply + 1] = reset_ms
  else
    local used = pending[key]
    if not used then
      used = state[key]
      if used == nil then
        used = tonumber(redis.call('GET', key) or '0')
        state[key] = used
      end
    end
    local reset_ms = midnight_ms - now_ms
    local retry_ms = reset_ms
    if used + limit_cost <= limit_cap then
      allowed = 1
      retry_ms = 0
      used = used + limit_cost
      pending[key] = used
      writes[#writes + 1] = {key, 'q', limit_cost}
    end
    reply[#reply + 1] = allowed
    reply[#reply + 1] = math.max(0, limit_cap - used)
    reply[#reply + 1] = retry_ms
    reply[#reply + 1] = reset_ms
  end
  if allowed == 0 then
    all_allowed = false
  end
end

if all_allowed then
  for _, w in ipairs(writes) do
    local key = w[1]
    if not dirty[key] then
      order[#order + 1] = key
    end
    if w[2] == 'b' then
      -- The last write of a key wins, as it did when each call wrote its own.
      state[key] = {w[3], now}
      dirty[key] = w
    else
      state[key] = state[key] + w[3]
      local before = dirty[key]
      dirty[key] = {key, 'q', (before and before[3] or 0) + w[3]}
    end
  end
end
end

for _, key in ipairs(order) do
  local w = dirty[key]
  if w[2] == 'b' then
    local tokens, bucket_rate, burst = w[3], w[4], w[5]
    -- %.17g and %d keep full precision; tostring() would round the timestamp to 14 digits.
    redis.call('HSET', key, 'tokens', string.format('%.17g', tokens),
               'ts', string.format('%d', now))
    local refill_ms = math.ceil((burst - tokens) / bucket_rate * 1000)
    redis.call('PEXPIRE', key, math.max(1, math.min(max_ms, refill_ms)))
  else
    redis.call('INCRBY', key, w[3])
    redis.call('PEXPIREAT', key, midnight_ms)
  end
end
return reply
"""


# Calls per script run: bounds the script's time inside Redis (which blocks other clients).
MAX_BATCH = 256
# Script runs in flight at once: while Redis runs one batch, the next is already on its way
# (with one, the event loop idles for the round trip whenever every request waits on it).
MAX_IN_FLIGHT = 2
_EPSILON = bulk(repr(TOKEN_EPSILON).encode())
_SMALL_INTS = [bulk(b"%d" % n) for n in range(MAX_BATCH + 1)]


def _int(n: int) -> bytes:
    return _SMALL_INTS[n] if n <= MAX_BATCH else bulk(b"%d" % n)


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
        self._check = ScriptPipe(client, _CHECK_LUA)
        self._queue: list[tuple[Sequence[Limit], asyncio.Future[list[Decision]]]] = []
        self._flush_scheduled = False
        self._senders: set[asyncio.Task[None]] = set()
        self._wires: dict[Limit, tuple[bytes, bytes]] = {}

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
        """One script call for every check() queued while the previous call was out.

        Concurrent requests each need one atomic check; sent one by one they each pay a round
        trip, a pooled connection and redis-py's per-command cost. Checks made while a script
        call is in flight wait for it to return (or, when none is, for the loop's next turn)
        and then go out together as one EVALSHA whose script runs them in order, so each gets
        exactly the answer it would have had alone. Under load a batch thus gathers what
        arrived during one round trip, not just one loop turn: fewer, larger calls.
        """
        if not limits:
            return []
        future: asyncio.Future[list[Decision]] = asyncio.get_running_loop().create_future()
        self._queue.append((limits, future))
        if not self._flush_scheduled and len(self._senders) < MAX_IN_FLIGHT:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), MAX_BATCH):
            task = asyncio.create_task(self._send(queue[start : start + MAX_BATCH]))
            self._senders.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._senders.discard(task)
        if len(self._senders) < MAX_IN_FLIGHT and self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(
        self, batch: list[tuple[Sequence[Limit], asyncio.Future[list[Decision]]]]
    ) -> None:
        # Each distinct limit once (by identity: callers reuse their Limit objects; an equal
        # one listed again is only a longer argument list), each call as the shape it checks.
        numbers: dict[int, int] = {}
        keys: list[bytes] = []
        wires: list[bytes] = []
        shapes: dict[tuple[int, ...], int] = {}
        calls: list[int] = []
        total = 0
        for limits, _ in batch:
            total += len(limits)
            shape = []
            for limit in limits:
                number = numbers.get(id(limit))
                if number is None:
                    number = numbers[id(limit)] = len(numbers) + 1
                    key, wire = self._wire(limit)
                    keys.append(key)
                    wires.append(wire)
                shape.append(number)
            calls.append(shapes.setdefault(tuple(shape), len(shapes) + 1))
        args: list[bytes] = [_EPSILON, _int(len(keys)), *wires, _int(len(shapes))]
        for shape_numbers in shapes:
            args.append(_int(len(shape_numbers)))
            args += map(_int, shape_numbers)
        args.append(_int(len(calls)))
        args += map(_int, calls)
        # Each wire holds a limit's 4 arguments; every other item is one.
        packed = self._check.command(keys, args, arg_count=len(args) + 3 * len(wires))
        try:
            values = _ints(await self._check.call(packed), 4 * total)
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        offset = 0
        for limits, future in batch:
            decisions = []
            for limit in limits:
                allowed, remaining, retry_ms, reset_ms = values[offset : offset + 4]
                offset += 4
                decisions.append(
                    Decision(
                        allowed=allowed == 1,
                        limit=limit.burst if limit.kind == "bucket" else limit.limit,
                        remaining=remaining,
                        reset_s=reset_ms / 1000,
                        retry_after_s=retry_ms / 1000,
                    )
                )
            if not future.done():  # a cancelled caller still spent its tokens, as before
                future.set_result(decisions)

    def _wire(self, limit: Limit) -> tuple[bytes, bytes]:
        """The limit's key and arguments as RESP, encoded once (the same few limits recur)."""
        wire = self._wires.get(limit)
        if wire is None:
            if len(self._wires) >= 10_000:
                self._wires.clear()
            if limit.kind == "bucket":
                key = f"{self._prefix}b:{limit.key}"
                args = ["b", repr(float(limit.rate)), str(limit.burst), str(limit.cost)]
            else:
                key = f"{self._prefix}q:{limit.key}"
                args = ["q", "0", str(limit.limit), str(limit.cost)]
            wire = bulk(key.encode()), b"".join(bulk(a.encode()) for a in args)
            self._wires[limit] = wire
        return wire

    async def close(self) -> None:
        await self._check.close()
        if self._owns_client:
            await self._client.aclose()

    async def ping(self) -> None:
        await self._client.ping()


def _ints(reply: Any, n: int) -> list[int]:
    # Script replies are untyped; fail loudly rather than hand out a wrong decision.
    if not isinstance(reply, Sequence) or len(reply) != n:
        raise TypeError(f"unexpected rate limit script reply: {reply!r}")
    return [int(value) for value in reply]
