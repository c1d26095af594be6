"""The background worker: the outbox relay plus every capability's queue consumers.

`relayport worker` runs it alone (scaled out on RabbitMQ); `relayport serve` runs it inside the
API process when the broker is in-process, since an in-process queue has no other consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relayport.core.broker import Message
from relayport.core.outbox import OutboxRelay
from relayport.core.platform import Platform
from relayport.delivery import worker as delivery_worker
from relayport.ingest import worker as ingest_worker
from relayport.settings import Settings

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


PeriodicRun = Callable[[Platform], Awaitable[None]]


@dataclass(frozen=True)
class Periodic:
    """Work every worker runs on a timer (scheduling due retries, refreshing gauges); it must
    be safe with several workers running it at once."""

    name: str
    run: PeriodicRun
    interval_s: Callable[[Settings], float]


PERIODIC: list[Periodic] = []


def register_periodic(
    name: str, run: PeriodicRun, *, interval_s: Callable[[Settings], float]
) -> None:
    PERIODIC.append(Periodic(name, run, interval_s))


register(ingest_worker.QUEUE, ingest_worker.handle_job)
register_periodic(
    "ingest-scheduler", ingest_worker.tick, interval_s=lambda s: s.ingest.scheduler_interval_s
)
register(delivery_worker.QUEUE, delivery_worker.handle, prefetch=64)
register_periodic(
    "delivery-scheduler",
    delivery_worker.tick,
    interval_s=lambda s: s.delivery.scheduler_interval_s,
)

# Run when a worker stops, after in-flight work: capabilities close what they opened.
SHUTDOWN: list[PeriodicRun] = [delivery_worker.close]


class Worker:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.relay = OutboxRelay(platform.db, platform.broker, platform.settings.outbox)
        self._stop = asyncio.Event()
        self._relay_task: asyncio.Task[None] | None = None
        self._periodic_tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for consumer in CONSUMERS:

            async def handle(message: Message, consumer: Consumer = consumer) -> None:
                await consumer.handler(self.platform, message)

            await self.platform.broker.consume(consumer.queue, handle, prefetch=consumer.prefetch)
        self._relay_task = asyncio.create_task(self.relay.run(self._stop), name="outbox-relay")
        # Lets work enqueued in this process be published at once instead of at the next poll.
        self.platform.extras["outbox.wake"] = self.relay.wake
        self._periodic_tasks = [
            asyncio.create_task(self._every(task), name=task.name) for task in PERIODIC
        ]
        log.info(
            "worker started",
            extra={"event": "worker.started", "queues": [c.queue for c in CONSUMERS]},
        )

    async def _every(self, task: Periodic) -> None:
        interval = task.interval_s(self.platform.settings)
        while not self._stop.is_set():
            try:
                await task.run(self.platform)
            except Exception:
                # The database is away or a bug: log, and try again next round.
                log.exception(
                    "periodic task failed",
                    extra={"event": "worker.periodic_error", "task": task.name},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    async def stop(self, timeout_s: float) -> None:
        """Stop claiming new work and let in-flight work finish within `timeout_s`."""
        self._stop.set()
        if self._relay_task is not None:
            try:
                await asyncio.wait_for(self._relay_task, timeout_s)
            except TimeoutError:
                log.warning("outbox relay did not stop in time", extra={"event": "worker.stop"})
        if self._periodic_tasks:
            _, late = await asyncio.wait(self._periodic_tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._periodic_tasks, return_exceptions=True)
        for close in SHUTDOWN:
            try:
                await close(self.platform)
            except Exception:
                log.exception("shutdown hook failed", extra={"event": "worker.stop"})
        log.info("worker stopped", extra={"event": "worker.stopped"})
