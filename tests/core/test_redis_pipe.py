"""ScriptPipe against a real Redis: pipelined EVALSHA calls on one kept connection."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relayport.core.redis_pipe import ScriptPipe, bulk

# Echoes its argument, or answers an error reply when asked to. The unique comment makes a
# script Redis has never seen, so the first call meets NOSCRIPT without flushing anyone's
# scripts.
ECHO = """
-- {tag}
if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to fail') end
return ARGV[1]
"""


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _pipe(client: Redis) -> ScriptPipe:
    return ScriptPipe(client, ECHO.format(tag=uuid.uuid4().hex))


def _echo(pipe: ScriptPipe, value: str) -> bytes:
    return pipe.command([], [bulk(value.encode())], arg_count=1)


async def test_a_script_redis_does_not_know_is_loaded_and_the_call_answered(
    client: Redis,
) -> None:
    pipe = _pipe(client)
    assert await client.script_exists(pipe.sha.decode()) == [False]
    assert await pipe.call(_echo(pipe, "hello")) == b"hello"
    assert await client.script_exists(pipe.sha.decode()) == [True]
    await pipe.close()


async def test_concurrent_calls_each_get_their_own_reply(client: Redis) -> None:
    pipe = _pipe(client)
    values = [f"v{i}" for i in range(200)]
    replies = await asyncio.gather(*(pipe.call(_echo(pipe, v)) for v in values))
    assert replies == [v.encode() for v in values]
    await pipe.close()


async def test_an_error_reply_fails_only_its_own_call(client: Redis) -> None:
    pipe = _pipe(client)
    await pipe.call(_echo(pipe, "load"))
    results = await asyncio.gather(
        pipe.call(_echo(pipe, "a")),
        pipe.call(_echo(pipe, "fail")),
        pipe.call(_echo(pipe, "b")),
        return_exceptions=True,
    )
    assert results[0] == b"a"
    assert results[2] == b"b"
    assert isinstance(results[1], ResponseError)
    assert "asked to fail" in str(results[1])
    assert await pipe.call(_echo(pipe, "after")) == b"after"
    await pipe.close()


async def test_a_cancelled_call_does_not_shift_the_replies_of_the_others(client: Redis) -> None:
    pipe = _pipe(client)
    await pipe.call(_echo(pipe, "load"))
    first = asyncio.create_task(pipe.call(_echo(pipe, "first")))
    second = asyncio.create_task(pipe.call(_echo(pipe, "second")))
    await asyncio.sleep(0)  # both are written
    first.cancel()
    assert await second == b"second"
    assert await pipe.call(_echo(pipe, "third")) == b"third"
    assert first.cancelled()
    await pipe.close()


async def test_calls_after_close_fail(client: Redis) -> None:
    pipe = _pipe(client)
    await pipe.call(_echo(pipe, "load"))
    await pipe.close()
    with pytest.raises(ConnectionError):
        await pipe.call(_echo(pipe, "late"))


async def test_a_reply_that_never_comes_times_out_every_call_in_flight() -> None:
    """A Redis that stops answering fails the calls in flight after the client's socket
    timeout instead of holding them forever. Played by a TCP server that reads and never
    answers: hanging a real Redis would stall every other client of it."""
    connections: list[asyncio.StreamWriter] = []
    received = bytearray()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while data := await reader.read(65536):
            received.extend(data)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # RESP2 and no driver info: the connection sends nothing before our commands.
    mute = Redis(host="127.0.0.1", port=port, socket_timeout=0.2, driver_info=None, protocol=2)
    pipe = ScriptPipe(mute, ECHO.format(tag="timeout"))
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(
        pipe.call(_echo(pipe, "a")), pipe.call(_echo(pipe, "b")), return_exceptions=True
    )
    waited = asyncio.get_running_loop().time() - started
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert 0.15 < waited < 2
    assert len(connections) == 1
    assert received.count(b"EVALSHA") == 2  # both calls went out on it, pipelined
    await pipe.close()
    await mute.aclose()
    server.close()
    await server.wait_closed()


async def test_a_call_cancelled_while_its_write_waits_leaves_later_replies_aligned(
    client: Redis,
) -> None:
    """A command too big for the socket buffers waits for them to drain; cancelled there,
    redis-py drops the connection. Later calls go out on a new one and each gets its own
    reply (none takes the reply meant for another)."""
    pipe = _pipe(client)
    assert await pipe.call(_echo(pipe, "warm")) == b"warm"
    big = asyncio.create_task(pipe.call(_echo(pipe, "x" * 50_000_000)))
    for _ in range(3):
        await asyncio.sleep(0)  # the write is under way, waiting to drain
    big.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await big
    replies = await asyncio.gather(*(pipe.call(_echo(pipe, v)) for v in ("B", "C", "D")))
    assert replies == [b"B", b"C", b"D"]
    await pipe.close()
