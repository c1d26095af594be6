"""Per-process cache of what fan-out reads for every message: each tenant's enabled endpoints
(id, fifo, filters) and the JSON Schemas of its event types.

Correct across processes without pub/sub: every change that alters what fan-out would read
(an endpoint created, changed, deleted or disabled; an event type created, changed or
deleted) moves the tenant's version, `delivery_tenant_settings.updated_at`, in the same
transaction as the change (`bump`). A batch of messages reads the versions of its tenants
first, in its own transaction, and uses a cached entry only if its version is the one read;
otherwise it reads the rows again. A version is read before the rows it guards, so a cached
entry is never older than its version; a change committed before a message's transaction
began is therefore always seen, whichever process made it.

A version only ever changes (`bump` moves it forward by at least a microsecond), so equal
versions mean no change in between.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core.db import utcnow
from relayport.core.platform import Platform
from relayport.delivery import repository

_KEY = "delivery.catalog"
MAX_TENANTS = 10_000
MAX_TYPES = 1_000  # event-type schemas kept per tenant entry
_MISSING = dt.datetime.min.replace(tzinfo=dt.UTC)  # the version of a tenant with no row yet


@dataclass(slots=True)
class Entry:
    version: dt.datetime
    endpoints: list[Any]
    # event type -> its schema, or None for a type with no schema (or not in the catalog)
    schemas: dict[str, dict[str, Any] | None] = field(default_factory=dict)


class Catalog:
    """The cache of one process; `hits` and `loads` count for tests and logs."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.hits = 0
        self.loads = 0

    async def fan_out_view(
        self, session: AsyncSession, wanted: dict[str, set[str]]
    ) -> tuple[dict[str, list[Any]], dict[tuple[str, str], dict[str, Any]]]:
        """For {tenant: event types}: each tenant's enabled endpoints, and the schemas of the
        wanted (tenant, type) pairs that have one, current as of this transaction."""
        versions = await repository.tenant_versions(session, list(wanted))
        endpoints: dict[str, list[Any]] = {}
        schemas: dict[tuple[str, str], dict[str, Any]] = {}
        for tenant_id, types in wanted.items():
            version = versions.get(tenant_id, _MISSING)
            entry = self.entries.get(tenant_id)
            if entry is None or entry.version != version or len(entry.schemas) > MAX_TYPES:
                self.loads += 1
                entry = Entry(version, await repository.enabled_endpoints(session, tenant_id))
                if len(self.entries) >= MAX_TENANTS:
                    self.entries.clear()
                self.entries[tenant_id] = entry
            else:
                self.hits += 1
            missing = {t for t in types if t not in entry.schemas}
            if missing:
                found = await repository.event_type_schemas(
                    session, {(tenant_id, t) for t in missing}
                )
                for name in missing:
                    entry.schemas[name] = found.get((tenant_id, name))
            endpoints[tenant_id] = entry.endpoints
            for name in types:
                schema = entry.schemas.get(name)
                if schema is not None:
                    schemas[(tenant_id, name)] = schema
        return endpoints, schemas


def catalog_of(platform: Platform) -> Catalog:
    found = platform.extras.get(_KEY)
    if found is None:
        found = platform.extras[_KEY] = Catalog()
    assert isinstance(found, Catalog)
    return found


async def bump(session: AsyncSession, tenant_ids: Iterable[str]) -> None:
    """Move the tenants' versions forward, in the caller's transaction (which holds their
    rows locked until it ends, so concurrent bumps take turns)."""
    for tenant_id in sorted(set(tenant_ids)):
        await repository.bump_tenant_version(session, tenant_id, utcnow())
