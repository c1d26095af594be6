"""Direct writes for push streams: each event framed once, written straight to every socket.

Measured with 10,000 WebSocket subscribers in one process: handing each event to each
connection through its ASGI `send` (Starlette's `WebSocket.send`, the middleware send wrappers,
uvicorn's framing, plus waking one task per subscriber) cost 30-50 µs per subscriber, against a
few µs for `websockets.broadcast`, which frames once and writes to each transport. This module
gives the push streams the same path: an event is framed once per transport (a WebSocket text
frame, an HTTP/1.1 chunk holding the SSE event) and the hub writes those bytes to each
subscriber's transport in its fan-out loop, with no per-subscriber task, coroutine or wrapper.

The transport reaches the app through the ASGI scope extension `relayport.wire`, added by the
uvicorn protocol subclasses below, which `relayport serve` runs with. Only the per-event sends
of push streams take this path: the handshake, the response headers (and the first bytes of an
SSE body) and the close still go through ASGI and every middleware, so request ids, security
headers and metrics are unchanged. Without the extension (another ASGI server, an in-process
test client) streams use the ordinary ASGI path.

A raw frame is valid whatever was negotiated: frames written here are never compressed (RSV1
clear), which RFC 7692 allows on a permessage-deflate connection and leaves its compression
context untouched.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Literal, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

EXTENSION = "relayport.wire"
Framing = Literal["ws", "chunk"]


def ws_text_frame(payload: bytes) -> bytes:
    """One unmasked, uncompressed, final WebSocket text frame (server to client)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


def http_chunk(data: bytes) -> bytes:
    """`data` as one chunk of an HTTP/1.1 chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class Wire:
    """A direct-write handle on one connection's transport."""

    __slots__ = ("_conn", "framing", "limit", "transport")

    def __init__(self, conn: Any, framing: Framing) -> None:
        self._conn = conn  # the uvicorn WebSocket protocol or HTTP request/response cycle
        self.transport: asyncio.Transport = conn.transport  # set before either is created
        self.framing: Framing = framing
        self.limit = 0  # set by the stream: bytes buffered beyond which it counts as slow

    def closed(self) -> bool:
        conn = self._conn
        if self.framing == "ws":
            gone = conn.close_sent or conn.disconnected
        else:
            gone = conn.disconnected or conn.response_complete
        return bool(gone) or self.transport.is_closing()

    def usable(self) -> bool:
        """True once raw frames may follow what ASGI wrote (an HTTP body must be chunked)."""
        if self.framing == "ws":
            return bool(self._conn.handshake_complete) and not self.closed()
        cycle = self._conn
        return bool(cycle.response_started and cycle.chunked_encoding) and not self.closed()

    def write(self, frame: bytes) -> bool:
        """Write one framed message; False (and nothing written) when the connection is gone
        or more than `limit` bytes already wait in its buffer (a reader that fell behind)."""
        transport = self.transport
        if transport.get_write_buffer_size() > self.limit or self.closed():
            return False
        transport.write(frame)
        return True

    def buffered(self) -> int:
        return int(self.transport.get_write_buffer_size())

    def abort(self) -> None:
        """Drop the connection and whatever waits in its buffer."""
        self.transport.abort()

    def hand_over(self, owner: Owner) -> bool:
        """WebSocket: let the connection outlive the ASGI task, driven by `owner` (its text
        messages and its end go to the owner's callbacks). False if it cannot (not a
        WebSocket of ours, or already closing): keep serving it through ASGI."""
        conn = self._conn
        if not isinstance(conn, WireWebSocketProtocol) or self.closed():
            return False
        conn.owner = owner
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Close a handed-over WebSocket (the close handshake, as uvicorn does it)."""
        if isinstance(self._conn, WireWebSocketProtocol):
            self._conn.close_owned(code, reason)


def wire_of(scope: Any, framing: Framing) -> Wire | None:
    """The connection's direct-write handle, if the server provides one and it is usable."""
    extension = scope.get("extensions", {}).get(EXTENSION)
    wire = extension.get("wire") if extension else None
    if isinstance(wire, Wire) and wire.framing == framing and wire.usable():
        return wire
    return None


class Owner(Protocol):
    """What drives a WebSocket handed over by its ASGI task (`Wire.hand_over`)."""

    def on_text(self, text: str) -> None: ...

    def on_closed(self) -> None: ...


class WireWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, adding the `relayport.wire` extension to the scope, and
    able to keep a connection open after its ASGI task returns.

    A push stream's task, with its coroutine chain through every middleware, was about half of
    the memory of an idle subscriber (39 KiB, against 19 KiB for a bare ASGI WebSocket under
    uvicorn): once the handshake is done and the stream is on a wire, its owner takes the
    messages and the end, and the task finishes (measured: 23 KiB per idle subscriber).
    """

    owner: Owner | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][EXTENSION] = {"wire": Wire(self, "ws")}

    def handle_text(self, event: Any) -> None:
        owner = self.owner
        if owner is None or not event.fin:
            super().handle_text(event)
            return
        try:
            text = bytes(event.data).decode()
        except UnicodeDecodeError:
            self.conn.send_close(1007)
            self.handle_parser_exception()
            return
        owner.on_text(text)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.on_closed()

    def close_owned(self, code: int, reason: str) -> None:
        """uvicorn's handling of an ASGI `websocket.close`, for a stream without a task."""
        if self.close_sent or self.transport.is_closing():
            return
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    async def run_asgi(self) -> None:
        # uvicorn 0.54's, except that a connection handed to an owner stays open.
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.close_timer is None and self.owner is None:
            self.transport.close()


class WireHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, adding the `relayport.wire` extension to each request."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle: RequestResponseCycle | None = self.cycle
        # No new cycle for a WebSocket upgrade: the previous request's is still there.
        if cycle is not None and cycle.scope is self.scope:
            self.scope.setdefault("extensions", {})[EXTENSION] = {"wire": Wire(cycle, "chunk")}
