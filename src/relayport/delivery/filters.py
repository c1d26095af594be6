"""Which endpoints a message goes to (pure: no I/O)."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Event type names: dotted words, e.g. "invoice.paid"; a filter may end in ".*".
TYPE_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
TYPE_FILTER = re.compile(r"^([A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)(\.\*)?$|^\*$")
CHANNEL = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

# Sent by the platform about the tenant's own endpoints; an endpoint gets them only when its
# filter names them (exactly or by pattern), never through "all types".
OPERATIONAL_TYPES = frozenset(
    {"endpoint.disabled", "message.attempt.exhausted", "endpoint.circuit_opened"}
)


def type_matches(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])  # keeps the dot: "invoice." prefix
    return pattern == event_type


def accepts(
    filter_types: Sequence[str] | None,
    endpoint_channels: Sequence[str] | None,
    event_type: str,
    message_channels: Sequence[str] | None,
) -> bool:
    """True when an endpoint with these filters receives a message of this type/channels.

    An endpoint without channels receives every channel; one with channels receives only
    messages that name at least one of them.
    """
    if filter_types is None:
        if event_type in OPERATIONAL_TYPES:
            return False
    elif not any(type_matches(p, event_type) for p in filter_types):
        return False
    if endpoint_channels:
        return bool(message_channels) and not set(endpoint_channels).isdisjoint(
            message_channels or ()
        )
    return True
