"""What a live-configuration stream is made of: shared encoded events and bounded subscribers."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from relayport.configs.wire import Framing, Wire, http_chunk, ws_text_frame
from relayport.core.pubsub import SubscriptionLost
from relayport.core.telemetry import REGISTRY


def _metrics() -> tuple[Any, Any]:
    from prometheus_client import Counter, Gauge

    return (
        Gauge("relayport_config_subscribers", "Live configuration subscribers", registry=REGISTRY),
        Counter(
            "relayport_config_slow_consumers_total",
            "Subscribers disconnected for falling behind",
            registry=REGISTRY,
        ),
    )


SUBSCRIBERS, SLOW = _metrics()


class Event:
    """One message to clients, encoded once per variant and transport, shared by all."""

    __slots__ = ("_frames", "_sse", "_text", "kind", "payloads", "revision")

    def __init__(
        self, kind: str, revision: int, redacted: dict[str, Any], full: dict[str, Any] | None
    ) -> None:
        # Index 0: secrets as commitments; index 1: secret values (for allowed clients), None
        # when this process applied the version without them (no secret reader was here).
        self._init(
            kind, revision, orjson.dumps(redacted), None if full is None else orjson.dumps(full)
        )

    def _init(self, kind: str, revision: int, redacted: bytes, full: bytes | None) -> None:
        self.kind = kind
        self.revision = revision
        self.payloads = (redacted, full)
        self._sse: list[bytes | None] = [None, None]
        self._text: list[str | None] = [None, None]
        self._frames: dict[tuple[Framing, bool], bytes] = {}

    @classmethod
    def encoded(cls, kind: str, revision: int, redacted: bytes, full: bytes | None) -> Event:
        """An event from payloads already encoded (as announced by another process)."""
        event = cls.__new__(cls)
        event._init(kind, revision, redacted, full)
        return event

    @property
    def has_full(self) -> bool:
        """Whether the variant with secret values exists (see `Channel.take`)."""
        return self.payloads[1] is not None

    def json(self, secrets: bool) -> bytes:
        payload = self.payloads[secrets]
        if payload is None:  # the hub never hands such an event to a secret reader
            raise LookupError(f"revision {self.revision} has no variant with secrets here")
        return payload

    def sse(self, secrets: bool) -> bytes:
        frame = self._sse[secrets]
        if frame is None:
            # Heartbeats carry no id: Last-Event-ID must only ever name a version.
            tag = "" if self.kind == "heartbeat" else f"id: {self.revision}\n"
            head = f"{tag}event: {self.kind}\ndata: ".encode()
            frame = self._sse[secrets] = head + self.json(secrets) + b"\n\n"
        return frame

    def text(self, secrets: bool) -> str:
        text = self._text[secrets]
        if text is None:
            text = self._text[secrets] = self.json(secrets).decode()
        return text

    def frame(self, framing: Framing, secrets: bool) -> bytes:
        """The event as bytes for a transport's wire (see `wire.py`), built once."""
        frame = self._frames.get((framing, secrets))
        if frame is None:
            if framing == "ws":
                frame = ws_text_frame(self.json(secrets))
            else:
                frame = http_chunk(self.sse(secrets))
            self._frames[framing, secrets] = frame
        return frame


class Subscriber:
    """A bounded queue of events, or a direct wire; falling behind marks it lost (to resync).

    Waiting is a bare future, not `asyncio.Event` + `wait_for`: with 10,000 subscribers a task
    and a timer per subscriber per event would cost more than the sends. Heartbeats come from
    the hub's ticker as shared events, so no subscriber needs a timer of its own.

    With a wire (`use_wire`), `offer` writes the event's frame to the connection's transport at
    once and the stream's task only waits for the end; the queue is then unused. Either way a
    slow reader is bounded: `bound` queued events, or `wire.limit` bytes in the socket buffer.
    """

    __slots__ = (
        "_items",
        "_waiter",
        "active",
        "bound",
        "key_id",
        "lost",
        "name",
        "on_lost",
        "secrets",
        "slow",
        "wire",
    )

    def __init__(
        self, secrets: bool, bound: int, key_id: str | None = None, name: str | None = None
    ) -> None:
        self.secrets = secrets
        self.key_id = key_id
        self.name = name  # the client's name, when it gave one (tracked as connected)
        self.bound = bound
        self.lost = False
        self.slow = False  # lost because it fell behind (not revoked, closed or draining)
        self.active = False  # got an event since the last heartbeat tick
        self.wire: Wire | None = None
        # Called once (soon, not from inside the fan-out) when it is lost: streams without a
        # task of their own (a handed-over WebSocket) close on it.
        self.on_lost: Callable[[], None] | None = None
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event) -> None:
        if self.lost:
            return
        if self.secrets and not event.has_full:
            # Not expected (a channel with secret readers reads such versions from the
            # database); should it happen, a resync beats a wrong or missing revision.
            self._fell_behind(False)
            return
        wire = self.wire
        if wire is not None:
            if not wire.write(event.frame(wire.framing, self.secrets)):
                self._fell_behind(not wire.closed())
                return
        elif len(self._items) >= self.bound:
            # Never block the fan-out on one reader: drop it, it reconnects and resyncs.
            self._fell_behind(True)
            return
        else:
            self._items.append(event)
            self._wake()
        if event.kind != "heartbeat":
            self.active = True

    def use_wire(self, wire: Wire, first: list[Event]) -> None:
        """Write `first` and whatever was queued meanwhile, then write every later event
        directly. Synchronous, so nothing offered in between can overtake them."""
        pending = [*first, *self._items]
        self._items.clear()
        self.wire = wire
        for event in pending:
            if self.lost:
                break
            if self.secrets and not event.has_full:
                self._fell_behind(False)
                break
            if not wire.write(event.frame(wire.framing, self.secrets)):
                self._fell_behind(not wire.closed())

    def _fell_behind(self, slow: bool) -> None:
        self.lost = True
        self._items.clear()
        if slow:
            self.slow = True
            SLOW.inc()
        self._end()

    def drop(self) -> None:
        self.lost = True
        self._end()

    def _end(self) -> None:
        self._wake()
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            asyncio.get_running_loop().call_soon(callback)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> list[Event]:
        """The queued events, waiting for at least one; raises `SubscriptionLost`.

        With a wire nothing is queued: this waits until the subscriber is lost."""
        while not self._items and not self.lost:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.lost:
            raise SubscriptionLost("subscriber fell behind" if self.slow else "stream ended")
        items = list(self._items)
        self._items.clear()
        return items
