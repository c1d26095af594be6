"""The hub's GC policy: long-lived subscribers are frozen out of the cyclic collector, and when
half of them are gone the rest (and whatever else the process froze) stay frozen.

The hub runs on a stand-in platform that holds only real settings: its freeze bookkeeping
needs no database, and subscribers are attached and detached through the hub's own methods.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from relayport.configs.push import Channel, Hub
from relayport.configs.subscribers import SUBSCRIBERS, Subscriber
from relayport.settings import Settings


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


async def test_half_the_subscribers_leaving_keeps_the_rest_frozen(unfrozen: None) -> None:
    settings = Settings(_env_file=None, env="test", configs={"gc_freeze_from": 2})
    hub = Hub(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    channel = Channel(hub, "ten_1", "env_1")
    subscribers = [Subscriber(False, hub.bound, "key_1", f"c{i}") for i in range(8)]
    for subscriber in subscribers:
        channel.subscribers.add(subscriber)
        SUBSCRIBERS.inc()
        hub.count += 1
        hub._gc_freeze()
    assert hub.frozen_at == 8
    assert gc.get_freeze_count() > 0

    for subscriber in subscribers[:5]:
        hub.detach(channel, subscriber)
    # Below half: the closed ones were collected and what lives on was frozen again.
    assert hub.count == 3
    assert hub.frozen_at == 3
    assert gc.get_freeze_count() > 0

    for subscriber in subscribers[5:]:
        hub.detach(channel, subscriber)
    assert hub.count == 0
    assert hub.frozen_at == 0  # below the threshold: the hub stops managing the freeze
    channel.task.cancel()
