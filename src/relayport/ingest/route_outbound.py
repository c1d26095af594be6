"""The `outbound` handler: an inbound event becomes an outbound message of the source's tenant,
fanned out to its endpoints like any message posted to /v1/messages.

The message's idempotency key is the inbox event's id, so a job that runs twice (a retry after
a crash, a replay within the idempotency window) sends the event out once.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select

from relayport.core.platform import Platform
from relayport.delivery import messages
from relayport.ingest.models import Source

_NOT_TYPE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
_DOTS = re.compile(r"\.{2,}")


def outbound_type(value: str) -> str:
    """A provider's event type as an outbound type name: dotted words of [A-Za-z0-9_-]."""
    cleaned = _DOTS.sub(".", _NOT_TYPE_CHAR.sub("_", value)).strip(".")[:200]
    return cleaned or "event"


async def route_outbound(platform: Platform, event: dict[str, Any]) -> None:
    source_id = str(event.get("source", "")).rsplit("/", 1)[-1]
    data = event.get("data")
    payload = (
        data if isinstance(data, dict) else {"data": data, "data_base64": event.get("data_base64")}
    )
    async with platform.db.transaction() as session:
        tenant_id = await session.scalar(select(Source.tenant_id).where(Source.id == source_id))
        if tenant_id is None:
            return  # the source was deleted after the event came in: nobody to send it for
        await messages.create_message(
            session,
            tenant_id,
            event_type=outbound_type(str(event["type"])),
            payload=payload,
            channels=None,
            idempotency_key=f"inbound:{event['id']}",
            idempotency_ttl_s=platform.settings.delivery.idempotency_ttl_s,
        )
    messages.wake(platform)
