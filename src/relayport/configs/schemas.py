"""Request and response bodies of live configuration."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, Field

from relayport.core.schemas import Name, Strict

EnvName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w.-]*$")]
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"
Message = Annotated[str, Field(max_length=1000)]


class ProjectCreate(Strict):
    name: Name


class ProjectOut(BaseModel):
    id: str
    name: str
    created_at: dt.datetime


class EnvironmentCreate(Strict):
    name: EnvName
    from_: str | None = Field(
        default=None,
        alias="from",
        max_length=100,
        description="Branch from this environment (id or name): revision 1 copies its head.",
    )


class EnvironmentOut(BaseModel):
    id: str
    project_id: str
    name: str
    branched_from: str | None
    revision: int
    head_hash: str
    created_at: dt.datetime


class ConfigPut(Strict):
    value: Any = Field(description="Any JSON value.")
    schema_: dict[str, Any] | bool | None = Field(
        default=None, alias="schema", description="JSON Schema, draft 2020-12 or draft 7."
    )
    message: Message = ""


class WriteResult(BaseModel):
    revision: int
    hash: str
    etag: str | None = None


class ConfigOut(BaseModel):
    key: str
    value: Any
    schema_: Any = Field(default=None, alias="schema", serialization_alias="schema")
    revision: int
    etag: str


class EnvironmentConfig(BaseModel):
    revision: int
    hash: str
    configs: dict[str, Any]
    schemas: dict[str, Any]
    secrets_revealed: bool


class Rollback(Strict):
    to_revision: int = Field(ge=1, le=2**31 - 1)
    message: Message = ""


class Promote(Strict):
    to: str = Field(min_length=1, max_length=100, description="Target environment id or name.")
    keys: list[Annotated[str, Field(pattern=KEY_PATTERN)]] | None = Field(
        default=None, max_length=1000, description="Keys to copy; all keys when omitted."
    )
    message: Message = ""


class VersionOut(BaseModel):
    revision: int
    kind: str
    changed_keys: list[str]
    hash: str
    previous_hash: str
    author_type: str
    author_id: str
    message: str
    created_at: dt.datetime


class VersionDetail(VersionOut):
    config: dict[str, Any]
    schemas: dict[str, Any]
    secrets_revealed: bool


class VersionList(BaseModel):
    data: list[VersionOut]
    next: str | None = None


class DiffOut(BaseModel):
    from_: int = Field(serialization_alias="from")
    to: int
    patch: list[dict[str, Any]]


class VerifyOut(BaseModel):
    ok: bool
    revision: int
    head_hash: str
    problems: list[dict[str, Any]]


class ClientKeyCreate(Strict):
    name: Name
    secrets: bool = Field(default=False, description="May read secret values (operator+).")


class ClientKeyOut(BaseModel):
    id: str
    environment_id: str
    name: str
    prefix: str
    secrets: bool
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class ClientKeyCreated(ClientKeyOut):
    key: str = Field(description="Shown once.")


class ClientOut(BaseModel):
    id: str
    name: str
    client_key_id: str
    transport: str
    connected: bool
    revision: int | None
    acked_at: dt.datetime | None
    last_seen_at: dt.datetime


class Propagation(BaseModel):
    revision: int
    committed_at: dt.datetime
    connected: int
    acked: int
    p50_ms: float | None
    p99_ms: float | None


class AckIn(Strict):
    revision: int = Field(ge=1, le=2**31 - 1)
    client: str = Field(pattern=r"^[A-Za-z0-9][\w.:-]{0,99}$", description="The client's name.")
