"""Work queues: the `Broker` protocol, its in-process implementation and the factory.

A broker carries work that is due now (see the outbox for work due later). Semantics shared by
every implementation, and exercised against each of them by the tests:

- queues are named by plain strings and created on first use, each with a dead-letter queue
  `<queue>.dlq`;
- `publish` returns only once the broker holds the message (publisher confirms on RabbitMQ);
- a consumer's handler returning acks the message; raising dead-letters it (no requeue: a
  handler that failed once on a message will usually fail again, and retries with backoff
  belong to the database, not to a hot redelivery loop);
- delivery is at-least-once: a message whose handler was interrupted comes back with
  `redelivered=True`, so handlers dedupe by `message_id`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relayport.settings import Settings

logger = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The broker could not take or give a message (unreachable, closed, refused)."""


@dataclass(frozen=True, slots=True)
class Message:
    body: bytes
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    redelivered: bool = False


Handler = Callable[[Message], Awaitable[None]]


def dlq_name(queue: str) -> str:
    return queue + DLQ_SUFFIX


def check_queue_name(queue: str) -> None:
    """Refuse names the dead-letter scheme cannot carry (AMQP caps names at 255 bytes)."""
    if not queue or len(queue.encode()) > 255 - len(DLQ_SUFFIX):
        raise ValueError(f"bad queue name {queue!r}")
    if queue.endswith(DLQ_SUFFIX):
        # A DLQ is declared without a dead-letter target of its own, so publishing or
        # consuming it as a work queue would redeclare it with different arguments.
        raise ValueError(f"{queue!r} is a dead-letter queue: use take_dead_letters()")


class Broker(Protocol):
    async def start(self) -> None:
        """Connect; safe to call again after `close()`."""

    async def close(self) -> None:
        """Stop consumers, waiting for in-flight handlers up to the shutdown timeout."""

    async def ping(self) -> None:
        """Raise `BrokerError` unless the broker answers."""

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Return once the broker holds the message durably; raise `BrokerError` otherwise."""

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16) -> None:
        """Start a background consumer running up to `prefetch` handlers at once."""


class InProcessBroker:
    """Asyncio queues in this process: the embedded default, and the reference for the tests.

    Messages live only as long as this object; `close()` keeps them, so a `start()` after it
    (a consumer restart) sees what was left, as a RabbitMQ consumer would.

    With `confirm_on_settle` (what the app uses), `publish` returns only once a handler has
    settled the message (acked or dead-lettered) and refuses queues nobody consumes. Memory is
    not durable, so "published" must mean "handled": the outbox relay marks a row sent only
    then, and a restart re-publishes whatever was still in flight.
    """

    def __init__(
        self,
        *,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        confirm_on_settle: bool = False,
    ) -> None:
        self._shutdown_timeout = shutdown_timeout
        self._confirm_on_settle = confirm_on_settle
        self._settled: dict[int, asyncio.Future[None]] = {}
        self._consumed: set[str] = set()
        self._queues: dict[str, asyncio.Queue[Message]] = {}
        self._dead: defaultdict[str, deque[Message]] = defaultdict(deque)
        self._consumers: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._started = False

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False
        self._consumed.clear()
        consumers, self._consumers = self._consumers, []
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        inflight = set(self._inflight)
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=self._shutdown_timeout)
            for task in pending:
                task.cancel()  # the handler's finally-clause puts the message back
            await asyncio.gather(*pending, return_exceptions=True)

    async def ping(self) -> None:
        if not self._started:
            raise BrokerError("in-process broker is not started")

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        check_queue_name(queue)
        if not self._started:
            raise BrokerError("in-process broker is not started")
        message = Message(body=body, message_id=message_id, headers=dict(headers or {}))
        if not self._confirm_on_settle:
            self._queue(queue).put_nowait(message)
            return
        if queue not in self._consumed:
            raise BrokerError(f"no consumer for {queue!r} in this process")
        settled = asyncio.get_running_loop().create_future()
        self._settled[id(message)] = settled
        self._queue(queue).put_nowait(message)
        try:
            await settled
        finally:
            self._settled.pop(id(message), None)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16) -> None:
        check_queue_name(queue)
        if not self._started:
            raise BrokerError("in-process broker is not started")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        task = asyncio.create_task(
            self._consume_loop(queue, handler, prefetch), name=f"broker-consume:{queue}"
        )
        self._consumers.append(task)
        self._consumed.add(queue)

    def dead_letters(self, queue: str) -> list[Message]:
        """Messages dead-lettered from `queue`, oldest first, left in place."""
        return list(self._dead[queue])

    async def take_dead_letters(self, queue: str, *, limit: int = 1000) -> list[Message]:
        """Remove and return up to `limit` dead letters of `queue`, oldest first."""
        dead = self._dead[queue]
        return [dead.popleft() for _ in range(min(limit, len(dead)))]

    def queued(self, queue: str) -> int:
        return self._queue(queue).qsize()

    def _queue(self, name: str) -> asyncio.Queue[Message]:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = asyncio.Queue()
        return queue

    async def _consume_loop(self, queue: str, handler: Handler, prefetch: int) -> None:
        source = self._queue(queue)
        slots = asyncio.Semaphore(prefetch)
        while True:
            await slots.acquire()
            try:
                message = await source.get()
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(self._handle(queue, source, message, handler))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            task.add_done_callback(lambda _t: slots.release())

    async def _handle(
        self,
        queue: str,
        source: asyncio.Queue[Message],
        message: Message,
        handler: Handler,
    ) -> None:
        settled = False
        try:
            await handler(message)
            settled = True
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning(
                "broker handler failed; dead-lettering",
                extra={"event": "broker.dead_letter", "queue": queue, "id": message.message_id},
                exc_info=True,
            )
            # The same headers RabbitMQ adds when it dead-letters, so readers see one shape.
            death = {"x-first-death-queue": queue, "x-first-death-reason": "rejected"}
            self._dead[queue].append(replace(message, headers={**message.headers, **death}))
            settled = True
        finally:
            waiter = self._settled.get(id(message))
            if settled:
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif waiter is not None:
                # Interrupted with a publisher waiting: it re-publishes (its row stays unsent).
                if not waiter.done():
                    waiter.set_exception(BrokerError("handler interrupted"))
            else:
                # Interrupted (shutdown): give it back, as RabbitMQ does with an unacked message.
                source.put_nowait(replace(message, redelivered=True))


def create_broker(settings: Settings) -> Broker:
    """The broker the settings name: in-process without a URL, RabbitMQ for `amqp://`."""
    if settings.broker_url is None:
        return InProcessBroker(shutdown_timeout=settings.shutdown_timeout_s, confirm_on_settle=True)
    # Imported here so the embedded default never loads aio-pika.
    from relayport.core.broker_rabbitmq import RabbitMQBroker

    return RabbitMQBroker(settings.broker_url, shutdown_timeout=settings.shutdown_timeout_s)
