"""Pipelined calls of one Lua script on a Redis connection of its own.

redis-py's per-command path (packing every argument, checking a connection out of the pool
and back, the retry wrapper, a task per write when a socket timeout is set) cost ~18 µs per
rate-limit check on this machine, more than the rest of a request's limiting; the part of it
the limiter needs is ~100 lines. So callers hand in the command already encoded in RESP, it
goes out as one write on a connection this object opens with the client's settings, and
replies are matched to callers in the order the commands went out (Redis answers one
connection's commands in order). Several calls can be in flight at once: the next batch is on
its way while Redis runs the previous one. Connecting, writing and each reply are bounded by
the client's socket timeout (when it has one).

Connection loss or a timeout fails every call in flight with redis-py's ConnectionError or
TimeoutError; the next call opens a new connection. A script flushed from Redis (NOSCRIPT,
after a restart) is loaded again and the call sent once more.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any

import redis.asyncio
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _Link:
    """One connection and the calls in flight on it, oldest first."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # a redis.asyncio.Connection of our own, not the pool's
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.reader: asyncio.Task[None] | None = None
        self.broken = False


class ScriptPipe:
    """EVALSHA of one script, pipelined on a connection opened with `client`'s settings."""

    def __init__(self, client: redis.asyncio.Redis, source: str) -> None:
        self._client = client
        self._source = source
        # SHA-1 is how Redis names scripts, not a security measure here.
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest().encode()
        self._link: _Link | None = None
        self._opening = asyncio.Lock()
        self._loading = asyncio.Lock()
        self._loads = 0
        self._timeout: float | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def command(self, keys: list[bytes], args: list[bytes], arg_count: int) -> bytes:
        """EVALSHA of one bulk string (`bulk()`) per key and `arg_count` arguments encoded
        in `args` (an item may hold several bulk strings back to back)."""
        return b"".join(
            [
                b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + arg_count, self.sha),
                bulk(b"%d" % len(keys)),
                *keys,
                *args,
            ]
        )

    async def call(self, packed: bytes) -> Any:
        """Send one packed EVALSHA (from `command()`) and wait for its reply."""
        loads = self._loads
        try:
            return await self._call(packed)
        except NoScriptError:
            # Every call in flight meets NOSCRIPT at once; one of them loads the script.
            async with self._loading:
                if self._loads == loads:
                    await self._client.script_load(self._source)
                    self._loads += 1
            return await self._call(packed)

    async def _call(self, packed: bytes) -> Any:
        link = self._link
        if link is None or link.broken or not link.conn.is_connected:
            # Never let redis-py reconnect the link by itself: calls in flight on the old
            # socket would then take the replies meant for calls on the new one.
            if link is not None:
                self._break(link, ConnectionError("Redis connection lost"))
            link = await self._open()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # The connection is open, has no socket timeout and no health check, so
        # send_packed_command writes before its first await: appending first keeps `pending`
        # in wire order.
        link.pending.append(future)
        try:
            async with asyncio.timeout(self._timeout):  # a full socket buffer waits to drain
                await link.conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            # Whatever cut the send short (a cancellation included), redis-py has dropped the
            # connection: every call in flight on it fails, and this caller gets `exc` itself.
            future.cancel()
            self._break(link, exc)
            if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
                raise self._timed_out() from None
            raise
        if link.reader is None:
            link.reader = asyncio.create_task(self._read(link))
        return await future

    async def _open(self) -> _Link:
        async with self._opening:
            if self._closed:
                raise ConnectionError("script pipe closed")
            if self._link is None or self._link.broken:
                pool = self._client.connection_pool
                settings = dict(pool.connection_kwargs)
                self._timeout = settings.get("socket_timeout")
                settings["socket_timeout"] = None  # bounded here instead, see the docstring
                conn = pool.connection_class(**settings)
                try:
                    async with asyncio.timeout(self._timeout):
                        await conn.connect()  # type: ignore[no-untyped-call]
                except BaseException as exc:
                    await conn.disconnect(nowait=True)
                    if isinstance(exc, TimeoutError):
                        raise self._timed_out() from None
                    raise
                self._link = _Link(conn)
            return self._link

    async def _read(self, link: _Link) -> None:
        try:
            while link.pending:
                try:
                    async with asyncio.timeout(self._timeout):
                        reply = await link.conn.read_response()
                except ResponseError as exc:  # this command's error; the next reply follows
                    reply = exc
                except TimeoutError:
                    raise self._timed_out() from None
                future = link.pending.popleft()
                if future.done():
                    continue  # its caller was cancelled; the reply still had to be read
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except BaseException as exc:
            self._break(link, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            link.reader = None

    def _closed_one(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled():
            task.exception()  # a failed disconnect leaves nothing more to do

    def _timed_out(self) -> RedisTimeoutError:
        # redis-py's type, which the app answers with a 503 like any Redis failure.
        return RedisTimeoutError(f"no answer from Redis in {self._timeout} s")

    def _break(self, link: _Link, exc: BaseException) -> None:
        """The connection is unusable: fail every call in flight on it; open anew next time."""
        if not link.broken:
            link.broken = True
            if self._link is link:
                self._link = None
            task = asyncio.ensure_future(link.conn.disconnect(nowait=True))
            self._closing.add(task)  # the loop keeps only a weak reference to tasks
            task.add_done_callback(self._closed_one)
        error = exc if isinstance(exc, RedisError) else ConnectionError(f"Redis call: {exc!r}")
        while link.pending:
            future = link.pending.popleft()
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        """Fail what is in flight and close the connection."""
        async with self._opening:
            self._closed = True
            link, self._link = self._link, None
        if link is None or link.broken:
            return
        link.broken = True  # so the cancelled reader leaves the connection to us
        if link.reader is not None:
            link.reader.cancel()
            await asyncio.gather(link.reader, return_exceptions=True)
        await link.conn.disconnect()
        self._break(link, ConnectionError("script pipe closed"))
