"""Where a source's events go: named handlers, each an async callable of (platform, CloudEvent).

A handler gets the normalized event as a plain dict (no session: it does its own I/O) and
either returns, which succeeds the job, or raises, which schedules a retry. It may run more than
once for one event (at-least-once delivery), so it must be idempotent on the event's `id`.
When outbound delivery exists, a handler routes events into it through that capability's
service; until then `noop` (the default) and `log` are built in, and tests register their own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from relayport.core.platform import Platform

log = logging.getLogger("relayport.ingest")

EventHandler = Callable[[Platform, dict[str, Any]], Awaitable[None]]

HANDLERS: dict[str, EventHandler] = {}


def register(name: str, handler: EventHandler) -> None:
    """Make `handler` available to sources under `name` (replacing one of the same name)."""
    if not name or len(name) > 100:
        raise ValueError("a handler name has 1 to 100 characters")
    HANDLERS[name] = handler


def unregister(name: str) -> None:
    HANDLERS.pop(name, None)


def get(name: str) -> EventHandler | None:
    return HANDLERS.get(name)


async def noop(platform: Platform, event: dict[str, Any]) -> None:
    """Accept the event and do nothing: the inbox keeps it for reading and replay."""


async def log_event(platform: Platform, event: dict[str, Any]) -> None:
    """Log the event's envelope (never its data, which may hold personal data)."""
    log.info(
        "inbound event",
        extra={
            "event": "ingest.event",
            "event_id": event.get("id"),
            "type": event.get("type"),
            "source": event.get("source"),
        },
    )


register("noop", noop)
register("log", log_event)

# Imported here, not at the top: the module above must be complete first, and routing
# depends on the delivery capability only through its message service.
from relayport.ingest.route_outbound import route_outbound  # noqa: E402

register("outbound", route_outbound)
