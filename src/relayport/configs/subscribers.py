"""What a live-configuration stream is made of: shared encoded events and bounded subscribers."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import orjson

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

    __slots__ = ("_sse", "_text", "kind", "payloads", "revision")

    def __init__(self, kind: str, revision: int, redacted: dict[str, Any], full: dict[str, Any]):
        self.kind = kind
        self.revision = revision
        # Index 0: secrets as commitments; index 1: secret values (for allowed clients).
        self.payloads = (orjson.dumps(redacted), orjson.dumps(full))
        self._sse: list[bytes | None] = [None, None]
        self._text: list[str | None] = [None, None]

    def json(self, secrets: bool) -> bytes:
        return self.payloads[secrets]

    def sse(self, secrets: bool) -> bytes:
        frame = self._sse[secrets]
        if frame is None:
            # Heartbeats carry no id: Last-Event-ID must only ever name a version.
            tag = "" if self.kind == "heartbeat" else f"id: {self.revision}\n"
            head = f"{tag}event: {self.kind}\ndata: ".encode()
            frame = self._sse[secrets] = head + self.payloads[secrets] + b"\n\n"
        return frame

    def text(self, secrets: bool) -> str:
        text = self._text[secrets]
        if text is None:
            text = self._text[secrets] = self.payloads[secrets].decode()
        return text


class Subscriber:
    """A bounded queue of events; overflowing it marks the subscriber lost (to resync).

    Waiting is a bare future, not `asyncio.Event` + `wait_for`: with 10,000 subscribers a task
    and a timer per subscriber per event would cost more than the sends. Heartbeats come from
    the hub's ticker as shared events, so no subscriber needs a timer of its own.
    """

    __slots__ = ("_items", "_waiter", "active", "bound", "key_id", "lost", "secrets")

    def __init__(self, secrets: bool, bound: int, key_id: str | None = None) -> None:
        self.secrets = secrets
        self.key_id = key_id
        self.bound = bound
        self.lost = False
        self.active = False  # got an event since the last heartbeat tick
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event) -> None:
        if self.lost:
            return
        if len(self._items) >= self.bound:
            # Never block the fan-out on one reader: drop it, it reconnects and resyncs.
            self.lost = True
            self._items.clear()
            SLOW.inc()
        else:
            self._items.append(event)
            self.active = self.active or event.kind != "heartbeat"
        self._wake()

    def drop(self) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> list[Event]:
        """The queued events, waiting for at least one; raises `SubscriptionLost`."""
        while not self._items and not self.lost:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.lost:
            raise SubscriptionLost("subscriber fell behind")
        items = list(self._items)
        self._items.clear()
        return items
