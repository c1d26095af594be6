"""Live-configuration tables: projects, environments, append-only versions, client keys, acks."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from relayport.core.crypto_rotation import register_encrypted_column
from relayport.core.db import Base, utcnow


class Project(Base):
    __tablename__ = "config_projects"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Environment(Base):
    """An environment and its head: the row writers lock to assign the next revision."""

    __tablename__ = "config_environments"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    project_id: Mapped[str] = mapped_column(String(40), ForeignKey("config_projects.id"))
    name: Mapped[str] = mapped_column(String(100))
    branched_from: Mapped[str | None] = mapped_column(String(40), default=None)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    head_hash: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Version(Base):
    """One immutable state of an environment. Rows are only inserted (a trigger refuses UPDATE
    and DELETE), so the hash chain is also a storage-level guarantee."""

    __tablename__ = "config_versions"
    __table_args__ = (UniqueConstraint("environment_id", "revision"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    environment_id: Mapped[str] = mapped_column(String(40), ForeignKey("config_environments.id"))
    revision: Mapped[int] = mapped_column(Integer)
    # The stored document: {key: value}, each secret replaced by {"$secret": commitment}.
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    schemas: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    secret_pointers: Mapped[list[str]] = mapped_column(JSON, default=list)
    kind: Mapped[str] = mapped_column(String(16))
    changed_keys: Mapped[list[str]] = mapped_column(JSON, default=list)
    hash: Mapped[str] = mapped_column(String(64))
    previous_hash: Mapped[str] = mapped_column(String(64))
    author_type: Mapped[str] = mapped_column(String(16))
    author_id: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(String(1000), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class VersionSecrets(Base):
    """A version's secret values: one KeyRing token (a data key of its own), aad-bound to the
    version. Apart from `config_versions` because key rotation re-wraps it in place."""

    __tablename__ = "config_version_secrets"

    id: Mapped[str] = mapped_column(String(40), ForeignKey("config_versions.id"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    token: Mapped[str] = mapped_column(Text)


register_encrypted_column(VersionSecrets.token)


class ClientKey(Base):
    """A read-only credential for one environment, stored as SHA-256 like API keys."""

    __tablename__ = "config_client_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    environment_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("config_environments.id"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    secrets: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class ConfigClient(Base):
    """A client instance (named by the client) and the last revision it acknowledged."""

    __tablename__ = "config_clients"
    __table_args__ = (
        UniqueConstraint("client_key_id", "name"),
        Index("ix_config_clients_environment_id_id", "environment_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    environment_id: Mapped[str] = mapped_column(String(40), ForeignKey("config_environments.id"))
    client_key_id: Mapped[str] = mapped_column(String(40), ForeignKey("config_client_keys.id"))
    name: Mapped[str] = mapped_column(String(100))
    transport: Mapped[str] = mapped_column(String(16), default="")
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    revision: Mapped[int | None] = mapped_column(Integer, default=None)
    acked_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Ack(Base):
    """One client's acknowledgement of one revision, with the time from commit to ack."""

    __tablename__ = "config_acks"
    __table_args__ = (
        UniqueConstraint("client_id", "revision"),
        Index("ix_config_acks_environment_id_revision", "environment_id", "revision"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    environment_id: Mapped[str] = mapped_column(String(40), ForeignKey("config_environments.id"))
    client_id: Mapped[str] = mapped_column(String(40), ForeignKey("config_clients.id"))
    revision: Mapped[int] = mapped_column(Integer)
    acked_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    latency_ms: Mapped[float] = mapped_column(Float)
