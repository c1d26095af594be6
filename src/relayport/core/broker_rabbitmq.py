"""The RabbitMQ `Broker`, on aio-pika.

One robust connection per process. Publishing goes through one confirm-mode channel, so
`publish` returns only after RabbitMQ has written the persistent message to a durable queue;
each consumer gets its own channel, so its prefetch bounds only its own handlers and a channel
error in one consumer cannot stop the others or the publisher.

Dead letters use the default exchange: the work queue's `x-dead-letter-exchange` is "" and its
`x-dead-letter-routing-key` is `<queue>.dlq`, which the default exchange routes to the queue of
that name. That needs no extra exchange or binding to declare, and so nothing to drift.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from relayport.core.broker import (
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    BrokerError,
    Handler,
    Message,
    check_queue_name,
    dlq_name,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Consumer:
    channel: AbstractChannel
    queue: AbstractQueue
    tag: str


def _text_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    # AMQP field tables carry typed values; ours are strings, but a message from another client
    # may carry bytes or numbers, and handlers are promised `str`. Nested values (RabbitMQ's
    # `x-death` list) are dropped: the flat `x-first-death-*` headers say the same.
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if isinstance(value, bytes | bytearray):
            out[key] = bytes(value).decode("utf-8", "replace")
        elif isinstance(value, str | int | float | bool):
            out[key] = str(value)
    return out


class RabbitMQBroker:
    def __init__(
        self,
        url: str,
        *,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        operation_timeout: float = 10.0,
        connection_name: str = "relayport",
    ) -> None:
        self._url = url
        self._shutdown_timeout = shutdown_timeout
        self._timeout = operation_timeout
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._consumers: list[_Consumer] = []
        self._inflight: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            return
        try:
            self._connection = await aio_pika.connect_robust(
                self._url,
                timeout=self._timeout,
                client_properties={"connection_name": self._connection_name},
            )
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except Exception as exc:
            await self._close_connection()
            raise BrokerError(f"cannot connect to RabbitMQ: {exc}") from exc
        self._declared.clear()

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            try:
                # Stop new deliveries first; messages already delivered keep being handled.
                await consumer.queue.cancel(consumer.tag, timeout=self._timeout)
            except Exception:
                logger.warning("cancelling a consumer failed", exc_info=True)
        inflight = set(self._inflight)
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=self._shutdown_timeout)
            for task in pending:
                # Unacked, so RabbitMQ redelivers it when the channel closes below.
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for consumer in consumers:
            await _close_channel(consumer.channel)
        await self._close_connection()

    async def ping(self) -> None:
        channel = self._require_channel()
        try:
            # A passive declare of a built-in exchange is a cheap round trip that proves the
            # broker answers, not just that a socket is open.
            await channel.declare_exchange("amq.direct", passive=True, timeout=self._timeout)
        except Exception as exc:
            raise BrokerError(f"RabbitMQ does not answer: {exc}") from exc

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        check_queue_name(queue)
        channel = self._require_channel()
        message = aio_pika.Message(
            body,
            message_id=message_id,
            headers=dict(headers or {}),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._declare(channel, queue)
            # mandatory + on_return_raises: a queue deleted behind our back is an error, not
            # a silently dropped message.
            await channel.default_exchange.publish(
                message, routing_key=queue, mandatory=True, timeout=self._timeout
            )
        except Exception as exc:
            self._declared.discard(queue)  # redeclare next time, in case it was deleted
            raise BrokerError(f"publish to {queue!r} failed: {exc!r}") from exc

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 16) -> None:
        check_queue_name(queue)
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        connection = self._require_connection()
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch, timeout=self._timeout)
            amqp_queue = await self._declare_queues(channel, queue)
            tag = await amqp_queue.consume(
                partial(self._on_message, queue, handler), no_ack=False, timeout=self._timeout
            )
        except Exception as exc:
            raise BrokerError(f"cannot consume {queue!r}: {exc!r}") from exc
        self._consumers.append(_Consumer(channel=channel, queue=amqp_queue, tag=tag))

    async def take_dead_letters(self, queue: str, *, limit: int = 1000) -> list[Message]:
        """Remove and return up to `limit` dead letters of `queue`, oldest first."""
        check_queue_name(queue)
        connection = self._require_connection()
        channel = await connection.channel(publisher_confirms=False)
        try:
            await self._declare_queues(channel, queue)
            dlq = await channel.get_queue(dlq_name(queue), ensure=False)
            out: list[Message] = []
            while len(out) < limit:
                incoming = await dlq.get(fail=False, no_ack=False, timeout=self._timeout)
                if incoming is None:
                    break
                out.append(_message(incoming))
                await incoming.ack()
            return out
        finally:
            await _close_channel(channel)

    async def _on_message(
        self, queue: str, handler: Handler, incoming: AbstractIncomingMessage
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            message = _message(incoming)
            try:
                await handler(message)
            except Exception:
                logger.warning(
                    "broker handler failed; dead-lettering",
                    extra={
                        "event": "broker.dead_letter",
                        "queue": queue,
                        "id": message.message_id,
                    },
                    exc_info=True,
                )
                await incoming.reject(requeue=False)
                return
            await incoming.ack()
        except Exception:
            # The ack or reject did not reach RabbitMQ (connection lost): the message stays
            # unacked and comes back redelivered, which handlers are built to absorb.
            logger.warning("broker could not settle a message", exc_info=True)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _declare(self, channel: AbstractChannel, queue: str) -> None:
        if queue in self._declared:
            return
        async with self._declare_lock:
            if queue not in self._declared:
                await self._declare_queues(channel, queue)
                self._declared.add(queue)

    async def _declare_queues(self, channel: AbstractChannel, queue: str) -> AbstractQueue:
        # The DLQ first, so a message rejected right after the work queue exists has a home.
        await channel.declare_queue(dlq_name(queue), durable=True, timeout=self._timeout)
        return await channel.declare_queue(
            queue,
            durable=True,
            arguments={
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq_name(queue),
            },
            timeout=self._timeout,
        )

    def _require_connection(self) -> AbstractRobustConnection:
        if self._connection is None or self._connection.is_closed:
            raise BrokerError("RabbitMQ broker is not started")
        return self._connection

    def _require_channel(self) -> AbstractChannel:
        self._require_connection()
        if self._channel is None:
            raise BrokerError("RabbitMQ broker is not started")
        return self._channel

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:
                logger.warning("closing the RabbitMQ connection failed", exc_info=True)


def _message(incoming: AbstractIncomingMessage) -> Message:
    return Message(
        body=incoming.body,
        message_id=incoming.message_id or "",
        headers=_text_headers(incoming.headers),
        redelivered=bool(incoming.redelivered),
    )


async def _close_channel(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except Exception:
        logger.warning("closing a RabbitMQ channel failed", exc_info=True)
