"""The Broker contract, run against the in-process broker and a real RabbitMQ vhost."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import pytest

from relayport.core.broker import Broker, BrokerError, InProcessBroker, Message, create_broker
from relayport.core.broker_rabbitmq import RabbitMQBroker
from relayport.settings import Settings
from tests.fixtures.services import wait_until

BrokerFactory = Callable[..., Broker]


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerFactory]:
    url = request.getfixturevalue("amqp_url") if request.param == "rabbitmq" else None
    made: list[Broker] = []

    def make(*, shutdown_timeout: float = 5.0) -> Broker:
        broker: Broker
        if url is None:
            broker = InProcessBroker(shutdown_timeout=shutdown_timeout)
        else:
            broker = RabbitMQBroker(url, shutdown_timeout=shutdown_timeout)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


@pytest.fixture
def queue() -> str:
    return f"t.{secrets.token_hex(4)}"


async def take_dead_letters(broker: Broker, queue: str) -> list[Message]:
    assert isinstance(broker, InProcessBroker | RabbitMQBroker)
    return await broker.take_dead_letters(queue)


async def test_published_message_reaches_consumer(make_broker: BrokerFactory, queue: str) -> None:
    broker = make_broker()
    await broker.start()
    received: list[Message] = []

    async def handler(message: Message) -> None:
        received.append(message)

    await broker.consume(queue, handler)
    await broker.publish(queue, b"hello", message_id="m1")
    await wait_until(lambda: len(received) == 1, what="delivery")
    assert received[0].body == b"hello"
    assert received[0].redelivered is False


async def test_message_id_and_headers_are_preserved(make_broker: BrokerFactory, queue: str) -> None:
    broker = make_broker()
    await broker.start()
    received: list[Message] = []

    async def handler(message: Message) -> None:
        received.append(message)

    await broker.consume(queue, handler)
    headers = {"tenant-id": "ten_1", "traceparent": "00-abc-01", "note": "grüße"}
    await broker.publish(queue, b"\x00\xffbin", message_id="obx_42", headers=headers)
    await wait_until(lambda: len(received) == 1, what="delivery")
    assert received[0].message_id == "obx_42"
    assert dict(received[0].headers) == headers
    assert received[0].body == b"\x00\xffbin"


async def test_failing_handler_sends_message_to_dead_letter_queue(
    make_broker: BrokerFactory, queue: str
) -> None:
    broker = make_broker()
    await broker.start()
    calls: list[str] = []

    async def handler(message: Message) -> None:
        calls.append(message.message_id)
        raise RuntimeError("poison")

    await broker.consume(queue, handler)
    await broker.publish(queue, b"bad", message_id="m-bad", headers={"k": "v"})
    dead: list[Message] = []
    deadline = asyncio.get_running_loop().time() + 10
    while not dead and asyncio.get_running_loop().time() < deadline:
        dead.extend(await take_dead_letters(broker, queue))
        await asyncio.sleep(0.01)
    assert [(m.message_id, m.body) for m in dead] == [("m-bad", b"bad")]
    assert dead[0].headers["k"] == "v"
    assert dead[0].headers["x-first-death-queue"] == queue
    assert dead[0].headers["x-first-death-reason"] == "rejected"
    assert calls == ["m-bad"]  # rejected without requeue: never handed out again


async def test_message_published_without_consumer_is_delivered_after_restart(
    make_broker: BrokerFactory, queue: str
) -> None:
    broker = make_broker()
    await broker.start()
    await broker.publish(queue, b"waiting", message_id="m-early")
    await broker.close()

    await broker.start()
    received: list[Message] = []

    async def handler(message: Message) -> None:
        received.append(message)

    await broker.consume(queue, handler)
    await wait_until(lambda: len(received) == 1, what="delivery after restart")
    assert received[0].message_id == "m-early"


async def test_handler_cut_off_by_shutdown_is_redelivered(
    make_broker: BrokerFactory, queue: str
) -> None:
    broker = make_broker(shutdown_timeout=0.2)
    await broker.start()
    started = asyncio.Event()

    async def stuck(message: Message) -> None:
        started.set()
        await asyncio.Event().wait()

    await broker.consume(queue, stuck)
    await broker.publish(queue, b"slow", message_id="m-slow")
    await asyncio.wait_for(started.wait(), 10)
    await broker.close()  # gives up on the handler after shutdown_timeout

    await broker.start()
    received: list[Message] = []

    async def handler(message: Message) -> None:
        received.append(message)

    await broker.consume(queue, handler)
    await wait_until(lambda: len(received) == 1, what="redelivery")
    assert received[0].message_id == "m-slow"
    assert received[0].redelivered is True


async def test_close_waits_for_in_flight_handler_and_acks_it(
    make_broker: BrokerFactory, queue: str
) -> None:
    broker = make_broker(shutdown_timeout=10)
    await broker.start()
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def slow(message: Message) -> None:
        started.set()
        await release.wait()
        finished.append(message.message_id)

    await broker.consume(queue, slow)
    await broker.publish(queue, b"x", message_id="m-first")
    await asyncio.wait_for(started.wait(), 10)
    # The handler finishes only well after close() has begun, so close() must wait for it.
    asyncio.get_running_loop().call_later(0.3, release.set)
    await asyncio.wait_for(broker.close(), 10)
    assert finished == ["m-first"]

    # Had the first message been left unacked it would come back ahead of the sentinel.
    await broker.start()
    received: list[str] = []

    async def handler(message: Message) -> None:
        received.append(message.message_id)

    await broker.consume(queue, handler)
    await broker.publish(queue, b"y", message_id="m-sentinel")
    await wait_until(lambda: "m-sentinel" in received, what="sentinel")
    assert received == ["m-sentinel"]


async def test_prefetch_bounds_concurrent_handlers(make_broker: BrokerFactory, queue: str) -> None:
    broker = make_broker()
    await broker.start()
    release = asyncio.Event()
    running = 0
    peak = 0
    done: list[str] = []

    async def handler(message: Message) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done.append(message.message_id)

    for i in range(6):
        await broker.publish(queue, b"x", message_id=f"m{i}")
    await broker.consume(queue, handler, prefetch=2)
    await wait_until(lambda: running == 2, what="two handlers running")
    release.set()
    await wait_until(lambda: len(done) == 6, what="all handled")
    assert peak == 2


async def test_dead_letter_queue_names_are_refused_as_work_queues(
    make_broker: BrokerFactory,
) -> None:
    broker = make_broker()
    await broker.start()
    with pytest.raises(ValueError, match="dead-letter"):
        await broker.publish("orders.dlq", b"x", message_id="m")


def test_factory_picks_backend_from_settings() -> None:
    assert isinstance(create_broker(Settings(broker_url=None)), InProcessBroker)
    rabbit = create_broker(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672/"))
    assert isinstance(rabbit, RabbitMQBroker)


async def test_confirming_in_process_broker_publishes_only_once_handled() -> None:
    """The embedded default: memory is not durable, so publish means "a handler settled it"."""
    broker = InProcessBroker(shutdown_timeout=1, confirm_on_settle=True)
    await broker.start()
    with pytest.raises(BrokerError):  # nobody consumes: the outbox row must stay unsent
        await broker.publish("jobs", b"x", message_id="m0")
    handled: list[str] = []
    gate = asyncio.Event()

    async def handler(message: Message) -> None:
        if message.message_id == "slow":
            await gate.wait()
        handled.append(message.message_id)

    await broker.consume("jobs", handler)
    await broker.publish("jobs", b"x", message_id="m1")
    assert handled == ["m1"]
    slow = asyncio.create_task(broker.publish("jobs", b"x", message_id="slow"))
    await wait_until(lambda: broker.queued("jobs") == 0, what="slow message taken")
    await broker.close()  # shutdown interrupts the handler
    with pytest.raises(BrokerError):
        await slow
    assert "slow" not in handled
    assert broker.queued("jobs") == 0  # the publisher re-publishes; no second copy is kept
