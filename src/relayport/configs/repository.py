"""Queries of live configuration; every tenant-owned read goes through a TenantRepository."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import func, select, tuple_, update

from relayport.configs.models import (
    Ack,
    ClientKey,
    ConfigClient,
    Environment,
    Project,
    Version,
    VersionSecrets,
)
from relayport.core.repository import TenantRepository


class ProjectRepository(TenantRepository[Project]):
    model = Project
    not_found_detail = "no such project"

    async def by_name(self, name: str) -> Project | None:
        stmt = self.query().where(Project.name == name)
        return (await self.session.execute(stmt)).scalar_one_or_none()


class EnvironmentRepository(TenantRepository[Environment]):
    model = Environment
    not_found_detail = "no such environment"

    async def in_project(self, project_id: str, ref: str) -> Environment | None:
        """By id, or by name within the project."""
        column = Environment.id if ref.startswith("env_") else Environment.name
        stmt = self.query().where(Environment.project_id == project_id, column == ref)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def advance(self, env_id: str) -> tuple[int, str]:
        """Take the next revision: (new revision, previous head hash).

        An UPDATE first, so the row lock (PostgreSQL) or the write lock (SQLite) is held from
        here to the commit: concurrent writers of one environment queue up, each reads the head
        the previous one committed, and revisions commit in order without gaps.
        """
        stmt = (
            update(Environment)
            .where(Environment.id == env_id, Environment.tenant_id == self.tenant_id)
            .values(revision=Environment.revision + 1)
            .returning(Environment.revision, Environment.head_hash)
            .execution_options(synchronize_session=False)
        )
        row = (await self.session.execute(stmt)).one()
        return int(row[0]), str(row[1])

    async def set_head(self, env_id: str, head_hash: str) -> None:
        stmt = (
            update(Environment)
            .where(Environment.id == env_id, Environment.tenant_id == self.tenant_id)
            .values(head_hash=head_hash)
            .execution_options(synchronize_session=False)
        )
        await self.session.execute(stmt)


class VersionRepository(TenantRepository[Version]):
    model = Version
    not_found_detail = "no such version"

    async def at(self, env_id: str, revision: int) -> Version | None:
        stmt = self.query().where(Version.environment_id == env_id, Version.revision == revision)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def between(self, env_id: str, after: int, upto: int) -> Sequence[Version]:
        """Versions with after < revision <= upto, oldest first."""
        stmt = (
            self.query()
            .where(
                Version.environment_id == env_id,
                Version.revision > after,
                Version.revision <= upto,
            )
            .order_by(Version.revision)
        )
        return (await self.session.execute(stmt)).scalars().all()

    async def newest_first(self, env_id: str, *, limit: int, before: int | None) -> list[Version]:
        stmt = self.query().where(Version.environment_id == env_id)
        if before is not None:
            stmt = stmt.where(Version.revision < before)
        stmt = stmt.order_by(Version.revision.desc()).limit(limit + 1)
        return list((await self.session.execute(stmt)).scalars())

    async def secrets_token(self, version_id: str) -> str | None:
        stmt = select(VersionSecrets.token).where(
            VersionSecrets.id == version_id, VersionSecrets.tenant_id == self.tenant_id
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()


class ClientKeyRepository(TenantRepository[ClientKey]):
    model = ClientKey
    not_found_detail = "no such client key"

    async def revoked_among(self, ids: set[str]) -> set[str]:
        stmt = select(ClientKey.id).where(
            ClientKey.tenant_id == self.tenant_id,
            ClientKey.id.in_(sorted(ids)),
            ClientKey.revoked_at.is_not(None),
        )
        return set((await self.session.execute(stmt)).scalars())


class ClientRepository(TenantRepository[ConfigClient]):
    model = ConfigClient
    not_found_detail = "no such client"

    async def named(self, key_id: str, name: str) -> ConfigClient | None:
        stmt = self.query().where(ConfigClient.client_key_id == key_id, ConfigClient.name == name)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def connected_count(self, env_id: str, seen_after: dt.datetime) -> int:
        """Clients marked connected whose instance confirmed them after `seen_after`."""
        stmt = select(func.count()).where(
            ConfigClient.tenant_id == self.tenant_id,
            ConfigClient.environment_id == env_id,
            ConfigClient.connected.is_(True),
            ConfigClient.last_seen_at > seen_after,
        )
        return int((await self.session.execute(stmt)).scalar_one())

    async def touch(
        self, env_id: str, clients: Sequence[tuple[str, str]], now: dt.datetime
    ) -> None:
        """Confirm that these (client key id, name) clients are connected now. Also sets the
        flag: a disconnect recorded late by another instance (the client moved here) heals."""
        stmt = (
            update(ConfigClient)
            .where(
                ConfigClient.tenant_id == self.tenant_id,
                ConfigClient.environment_id == env_id,
                tuple_(ConfigClient.client_key_id, ConfigClient.name).in_(clients),
            )
            .values(connected=True, last_seen_at=now)
            .execution_options(synchronize_session=False)
        )
        await self.session.execute(stmt)


class AckRepository(TenantRepository[Ack]):
    model = Ack
    not_found_detail = "no such acknowledgement"

    async def latencies(self, env_id: str, revision: int) -> list[float]:
        stmt = select(Ack.latency_ms).where(
            Ack.tenant_id == self.tenant_id,
            Ack.environment_id == env_id,
            Ack.revision == revision,
        )
        return [float(v) for v in (await self.session.execute(stmt)).scalars()]

    async def exists(self, client_id: str, revision: int) -> bool:
        stmt = select(Ack.id).where(
            Ack.tenant_id == self.tenant_id, Ack.client_id == client_id, Ack.revision == revision
        )
        return (await self.session.execute(stmt)).first() is not None

    async def clients_at_or_after(self, env_id: str, revision: int) -> int:
        stmt = select(func.count()).where(
            ConfigClient.tenant_id == self.tenant_id,
            ConfigClient.environment_id == env_id,
            ConfigClient.revision >= revision,
        )
        return int((await self.session.execute(stmt)).scalar_one())
