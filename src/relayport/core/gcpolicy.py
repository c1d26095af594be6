"""Keep Python's cyclic garbage collector off the app's long-lived objects.

A started Relayport process holds ~190,000 objects that live as long as it does (modules,
routes, models, compiled statements). Under load, request objects that survive a few awaits
are promoted to the oldest generation, so full collections come often, and each one walked all
of those objects: 65-200 ms pauses every ~800 ingest deliveries (measured in-process), the p99
tail of every route and a steady share of CPU. `gc.freeze()` moves what exists out of the
collector's reach; what is frozen is never collected, which is what those objects want, and
the garbage frozen with them is a bounded, one-off amount.

When: once the app has started (its lifespan), and once more at a capability's first unit of
work (`freeze_once`, e.g. ingest's first delivery), which also catches what is built lazily.
The config hub freezes its long-lived subscribers as they pile up (`configs.push`).
"""

from __future__ import annotations

import gc

_frozen: set[str] = set()


def freeze_once(occasion: str) -> bool:
    """Freeze what exists now, once per process and occasion; True if it froze."""
    if occasion in _frozen:
        return False
    _frozen.add(occasion)
    gc.freeze()
    return True


def freeze_started_app() -> None:
    """After startup: collect the start's garbage first, so it is not frozen forever."""
    if "started" not in _frozen:
        gc.collect()
        freeze_once("started")
