"""Live configuration: projects, environments and every change to them, audited.

Functions take the request's session and never commit. Secrets are revealed only when the caller
passes `with_secrets` (decided by the routes from the principal or client key) and every such
read is audited.
"""

from __future__ import annotations

import secrets as pysecrets
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.configs.models import ClientKey, Environment, Project
from relayport.configs.repository import (
    ClientKeyRepository,
    EnvironmentRepository,
    ProjectRepository,
    VersionRepository,
)
from relayport.configs.versions import (
    Actor,
    State,
    chain_problems,
    commit,
    state_of,
)
from relayport.core import audit
from relayport.core.auth.principal import Principal
from relayport.core.auth.tokens import sha256_hex
from relayport.core.crypto import KeyRing
from relayport.core.errors import Conflict, NotFound, Problem, ValidationFailed
from relayport.core.ids import new_id

CLIENT_KEY_PREFIX = "rpc_"


def can_read_secrets(principal: Principal) -> bool:
    """Operators and admins read secret values; viewers see only their commitments."""
    return principal.has_role("operator")


def actor_of(principal: Principal) -> Actor:
    return Actor(principal.kind, principal.id, principal.tenant_id)


def audit_action(
    session: AsyncSession,
    principal: Principal,
    action: str,
    target: tuple[str, str],
    ip: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    audit.record_by(
        session,
        principal,
        action,
        ip=ip,
        target_type=target[0],
        target_id=target[1],
        details=details,
    )


async def create_project(
    session: AsyncSession, principal: Principal, name: str, *, ip: str | None
) -> Project:
    """A new project; names are unique per tenant (409 otherwise)."""
    repo = ProjectRepository(session, principal.tenant_id)
    if await repo.by_name(name) is not None:
        raise Conflict(f"a project named {name!r} exists", slug="project-exists")
    project = repo.add(Project(id=new_id("cfp"), tenant_id=principal.tenant_id, name=name))
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"a project named {name!r} exists", slug="project-exists") from None
    audit_action(session, principal, "config.project_created", ("project", project.id), ip)
    return project


async def environment(
    session: AsyncSession, tenant_id: str, project_id: str, ref: str
) -> Environment:
    """An environment of a project by id or name; 404 when either is missing or foreign."""
    await ProjectRepository(session, tenant_id).get(project_id)
    env = await EnvironmentRepository(session, tenant_id).in_project(project_id, ref)
    if env is None:
        raise NotFound("no such environment")
    return env


async def create_environment(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    project_id: str,
    name: str,
    source: str | None,
    *,
    ip: str | None,
    max_value_bytes: int,
) -> Environment:
    """A new environment; with `source`, a branch whose revision 1 copies the source's head."""
    await ProjectRepository(session, principal.tenant_id).get(project_id)
    repo = EnvironmentRepository(session, principal.tenant_id)
    if await repo.in_project(project_id, name) is not None or name.startswith("env_"):
        raise Conflict(f"an environment named {name!r} exists", slug="environment-exists")
    origin: Environment | None = None
    if source is not None:
        origin = await repo.in_project(project_id, source)
        if origin is None:
            raise ValidationFailed(
                "the source environment does not exist",
                errors=[{"pointer": "/from", "message": "no such environment in this project"}],
            )
    env = repo.add(
        Environment(
            id=new_id("env"),
            tenant_id=principal.tenant_id,
            project_id=project_id,
            name=name,
            branched_from=origin.id if origin else None,
        )
    )
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"an environment named {name!r} exists", slug="environment-exists") from None
    details: dict[str, Any] = {"name": name}
    if origin is not None:
        head = await state_of(
            session, keyring, principal.tenant_id, origin.id, origin.revision, with_secrets=True
        )
        full, schemas = head.full(), dict(head.schemas)
        await commit(
            session,
            keyring,
            tenant_id=principal.tenant_id,
            env_id=env.id,
            actor=actor_of(principal),
            kind="branch",
            message=f"branched from {origin.name} at revision {origin.revision}",
            mutate=lambda _: (full, schemas, sorted(full)),
            max_value_bytes=max_value_bytes,
        )
        details |= {"from": origin.id, "from_revision": origin.revision}
    audit_action(
        session, principal, "config.environment_created", ("environment", env.id), ip, details
    )
    return env


async def read(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    env: Environment,
    revision: int | None,
    *,
    with_secrets: bool,
    ip: str | None,
) -> State:
    """The environment at `revision` (head when None); revealing secrets is audited."""
    state = await state_of(
        session,
        keyring,
        principal.tenant_id,
        env.id,
        env.revision if revision is None else revision,
        with_secrets=with_secrets,
    )
    if with_secrets and state.pointers:
        audit_action(
            session,
            principal,
            "config.secrets_read",
            ("environment", env.id),
            ip,
            {"revision": state.revision, "pointers": state.pointers},
        )
    return state


async def create_client_key(
    session: AsyncSession,
    principal: Principal,
    env: Environment,
    name: str,
    with_secrets: bool,
    *,
    ip: str | None,
) -> tuple[ClientKey, str]:
    """A new client key; the plaintext is returned once and stored only as SHA-256."""
    if with_secrets and not can_read_secrets(principal):
        raise Problem(
            "only operators may create keys that read secrets",
            status=403,
            slug="insufficient-role",
            title="Insufficient role",
        )
    plaintext = CLIENT_KEY_PREFIX + pysecrets.token_urlsafe(32)
    key = ClientKey(
        id=new_id("cky"),
        tenant_id=principal.tenant_id,
        environment_id=env.id,
        name=name,
        prefix=plaintext[:12],
        key_hash=sha256_hex(plaintext),
        secrets=with_secrets,
        created_by=principal.id,
    )
    ClientKeyRepository(session, principal.tenant_id).add(key)
    audit_action(
        session,
        principal,
        "config.client_key_created",
        ("client_key", key.id),
        ip,
        {"environment": env.id, "secrets": with_secrets},
    )
    return key, plaintext


async def verify(session: AsyncSession, tenant_id: str, env: Environment) -> list[dict[str, Any]]:
    """Breaks in the environment's hash chain (empty when intact), head included."""
    versions = list(await VersionRepository(session, tenant_id).between(env.id, 0, env.revision))
    problems = chain_problems(versions)
    if versions and versions[-1].hash != env.head_hash:
        problems.append({"revision": env.revision, "problem": "head hash differs"})
    if len(versions) != env.revision:
        problems.append({"revision": env.revision, "problem": "versions missing"})
    return problems


def audit_key_revoked(
    session: AsyncSession, principal: Principal, key_id: str, *, ip: str | None
) -> None:
    audit_action(session, principal, "config.client_key_revoked", ("client_key", key_id), ip)
