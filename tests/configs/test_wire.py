"""Frames written straight to sockets, and subscribers writing through a wire (no server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from relayport.configs.subscribers import Event, Subscriber
from relayport.configs.wire import Wire, http_chunk, ws_text_frame
from relayport.core.pubsub import SubscriptionLost


def _parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536, 300_000])
def test_a_text_frame_parses_back_to_its_payload(size: int) -> None:
    payload = b"a" * size
    frame = _parse(ws_text_frame(payload))
    assert (frame.opcode, frame.fin, frame.rsv1, frame.data) == (Opcode.TEXT, True, False, payload)


def test_an_http_chunk_carries_its_length_in_hex() -> None:
    assert http_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffer = 0
        self.closing = False

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Conn:
    """What a wire reads of uvicorn's WebSocket protocol."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.close_sent = False
        self.disconnected = False
        self.handshake_complete = True


def _event(revision: int) -> Event:
    body: dict[str, Any] = {"type": "patch", "revision": revision}
    return Event("patch", revision, body, body)


def _wired() -> tuple[Subscriber, _Transport]:
    conn = _Conn()
    wire = Wire(conn, "ws")
    wire.limit = 100
    subscriber = Subscriber(False, bound=10)
    subscriber.offer(_event(1))  # queued before the wire exists
    subscriber.use_wire(wire, [_event(0)])
    return subscriber, conn.transport


def test_a_wired_subscriber_writes_the_catch_up_then_the_queue_then_live_events() -> None:
    subscriber, transport = _wired()
    subscriber.offer(_event(2))
    revisions = [_parse(f).data for f in transport.written]
    assert revisions == [_event(n).payloads[0] for n in (0, 1, 2)]
    assert not subscriber.lost


async def test_a_full_socket_buffer_marks_the_subscriber_slow_and_stops_writing() -> None:
    subscriber, transport = _wired()
    transport.buffer = 101
    subscriber.offer(_event(2))
    transport.buffer = 0
    subscriber.offer(_event(3))  # nothing more after the drop
    assert len(transport.written) == 2
    assert subscriber.lost
    assert subscriber.slow
    with pytest.raises(SubscriptionLost):
        await asyncio.wait_for(subscriber.next(), 1)


async def test_a_closed_connection_ends_the_subscriber_without_counting_it_slow() -> None:
    subscriber, transport = _wired()
    transport.closing = True
    subscriber.offer(_event(2))
    assert subscriber.lost
    assert not subscriber.slow
    assert len(transport.written) == 2
