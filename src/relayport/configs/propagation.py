"""Acknowledgements and propagation: which client applied which revision, and how fast."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.configs.models import Ack, ConfigClient, Environment
from relayport.configs.repository import AckRepository, ClientRepository, VersionRepository
from relayport.configs.schemas import ClientOut, Propagation
from relayport.core.db import Database, utcnow
from relayport.core.errors import NotFound, ValidationFailed
from relayport.core.ids import new_id
from relayport.core.schemas import ListResponse


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return round(ordered[rank - 1], 3)


def seen_after(heartbeat_interval_s: float, beats: int) -> dt.datetime:
    """Connected clients not confirmed since this time count as gone: the instance holding
    their stream confirms them every heartbeat interval, so only a crashed or cut-off instance
    misses `beats` of them."""
    return utcnow() - dt.timedelta(seconds=heartbeat_interval_s * beats)


async def propagation_of(
    session: AsyncSession, tenant_id: str, env: Environment, revision: int, alive: dt.datetime
) -> Propagation:
    version = await VersionRepository(session, tenant_id).at(env.id, revision)
    if version is None:
        raise NotFound(f"no revision {revision}")
    acks = AckRepository(session, tenant_id)
    latencies = await acks.latencies(env.id, revision)
    return Propagation(
        revision=revision,
        committed_at=version.created_at,
        connected=await ClientRepository(session, tenant_id).connected_count(env.id, alive),
        acked=await acks.clients_at_or_after(env.id, revision),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
    )


async def clients_of(
    session: AsyncSession,
    tenant_id: str,
    env: Environment,
    *,
    limit: int,
    after: str | None,
    alive: dt.datetime,
) -> ListResponse[ClientOut]:
    repo = ClientRepository(session, tenant_id)
    page = await repo.page(
        repo.query().where(ConfigClient.environment_id == env.id), limit=limit, after=after
    )
    return ListResponse(
        data=[
            ClientOut(
                id=c.id,
                name=c.name,
                client_key_id=c.client_key_id,
                transport=c.transport,
                connected=c.connected and c.last_seen_at > alive,
                revision=c.revision,
                acked_at=c.acked_at,
                last_seen_at=c.last_seen_at,
            )
            for c in page.items
        ],
        next=page.next,
    )


async def _client(
    session: AsyncSession, tenant_id: str, env_id: str, key_id: str, name: str
) -> ConfigClient:
    repo = ClientRepository(session, tenant_id)
    client = await repo.named(key_id, name)
    if client is None:
        client = repo.add(
            ConfigClient(
                id=new_id("ccl"),
                tenant_id=tenant_id,
                environment_id=env_id,
                client_key_id=key_id,
                name=name,
                last_seen_at=utcnow(),
            )
        )
        await session.flush()
    return client


async def set_connected(
    db: Database,
    tenant_id: str,
    env_id: str,
    key_id: str,
    name: str,
    *,
    connected: bool,
    transport: str,
) -> None:
    """Mark a named client (dis)connected, in its own short transaction."""
    for attempt in range(2):  # a concurrent first connect of the same name may win the insert
        try:
            async with db.transaction() as session:
                client = await _client(session, tenant_id, env_id, key_id, name)
                client.connected = connected
                client.transport = transport
                client.last_seen_at = utcnow()
            return
        except IntegrityError:
            if attempt:
                raise


async def record_ack(
    session: AsyncSession, tenant_id: str, env_id: str, key_id: str, name: str, revision: int
) -> bool:
    """Record that client `name` applied `revision`; False when it was already recorded."""
    version = await VersionRepository(session, tenant_id).at(env_id, revision)
    if version is None:
        raise ValidationFailed(
            "no such revision", errors=[{"pointer": "/revision", "message": "unknown revision"}]
        )
    client = await _client(session, tenant_id, env_id, key_id, name)
    now = utcnow()
    client.last_seen_at = now
    if client.revision is None or revision >= client.revision:
        client.revision = revision
        client.acked_at = now
    acks = AckRepository(session, tenant_id)
    if await acks.exists(client.id, revision):
        return False
    latency = (now - version.created_at).total_seconds() * 1000
    acks.add(
        Ack(
            id=new_id("ack"),
            tenant_id=tenant_id,
            environment_id=env_id,
            client_id=client.id,
            revision=revision,
            acked_at=now,
            latency_ms=max(0.0, latency),
        )
    )
    return True
