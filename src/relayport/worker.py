"""The background worker: the outbox relay plus every capability's queue consumers.

`relayport worker` runs it alone (scaled out on RabbitMQ); `relayport serve` runs it inside the
API process when the broker is in-process, since an in-process queue has no other consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relayport.core.broker import Message
from relayport.core.outbox import OutboxRelay
from relayport.core.platform import Platform

log = logging.getLogger("relayport.worker")

JobHandler = Callable[[Platform, Message], Awaitable[None]]


@dataclass(frozen=True)
class Consumer:
    queue: str
    handler: JobHandler
    prefetch: int = 16


# Capabilities add their consumers here at import time (see `relayport.app`).
CONSUMERS: list[Consumer] = []


def register(queue: str, handler: JobHandler, *, prefetch: int = 16) -> None:
    CONSUMERS.append(Consumer(queue, handler, prefetch))


class Worker:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.relay = OutboxRelay(platform.db, platform.broker, platform.settings.outbox)
        self._stop = asyncio.Event()
        self._relay_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for consumer in CONSUMERS:

            async def handle(message: Message, consumer: Consumer = consumer) -> None:
                await consumer.handler(self.platform, message)

            await self.platform.broker.consume(consumer.queue, handle, prefetch=consumer.prefetch)
        self._relay_task = asyncio.create_task(self.relay.run(self._stop), name="outbox-relay")
        log.info(
            "worker started",
            extra={"event": "worker.started", "queues": [c.queue for c in CONSUMERS]},
        )

    async def stop(self, timeout_s: float) -> None:
        """Stop claiming new work and let in-flight work finish within `timeout_s`."""
        self._stop.set()
        if self._relay_task is not None:
            try:
                await asyncio.wait_for(self._relay_task, timeout_s)
            except TimeoutError:
                log.warning("outbox relay did not stop in time", extra={"event": "worker.stop"})
        log.info("worker stopped", extra={"event": "worker.stopped"})
