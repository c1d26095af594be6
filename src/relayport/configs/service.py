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

from relayport.configs import documents as docs
from relayport.configs.models import ClientKey, Environment, Project
from relayport.configs.repository import (
    ClientKeyRepository,
    EnvironmentRepository,
    ProjectRepository,
    VersionRepository,
)
from relayport.configs.versions import (
    Actor,
    Committed,
    State,
    chain_problems,
    commit,
    key_etag,
    state_of,
)
from relayport.core import audit
from relayport.core.auth.principal import Principal
from relayport.core.auth.tokens import sha256_hex
from relayport.core.crypto import KeyRing
from relayport.core.errors import Conflict, NotFound, PreconditionFailed, Problem, ValidationFailed
from relayport.core.ids import new_id

CLIENT_KEY_PREFIX = "rpc_"


def can_read_secrets(principal: Principal) -> bool:
    """Operators and admins read secret values; viewers see only their commitments."""
    return principal.has_role("operator")


def actor_of(principal: Principal) -> Actor:
    return Actor(principal.kind, principal.id, principal.tenant_id)


def _audit(
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
    _audit(session, principal, "config.project_created", ("project", project.id), ip)
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
    _audit(session, principal, "config.environment_created", ("environment", env.id), ip, details)
    return env


def _if_match(head: State, key: str, if_match: str | None) -> None:
    if if_match is None:
        return
    if if_match.strip() == "*":
        if key not in head.stored:
            raise PreconditionFailed(f"{key!r} does not exist")
        return
    current = key_etag(head, key) if key in head.stored else None
    offered = {tag.strip().removeprefix("W/") for tag in if_match.split(",")}
    if current is None or current not in offered:
        raise PreconditionFailed(f"{key!r} changed since that ETag", slug="precondition-failed")


async def _write(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    env: Environment,
    *,
    kind: str,
    message: str,
    mutate: Any,
    ip: str | None,
    max_value_bytes: int,
    details: dict[str, Any],
) -> Committed:
    done = await commit(
        session,
        keyring,
        tenant_id=principal.tenant_id,
        env_id=env.id,
        actor=actor_of(principal),
        kind=kind,
        message=message,
        mutate=mutate,
        max_value_bytes=max_value_bytes,
    )
    details |= {"revision": done.version.revision, "keys": done.version.changed_keys}
    _audit(session, principal, f"config.{kind}", ("environment", env.id), ip, details)
    return done


async def put_key(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    env: Environment,
    key: str,
    value: Any,
    schema: Any,
    *,
    message: str,
    if_match: str | None,
    ip: str | None,
    max_value_bytes: int,
) -> Committed:
    """Set one key (and its schema, when given; otherwise the key keeps its schema)."""

    def mutate(head: State) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        _if_match(head, key, if_match)
        full, schemas = head.full(), dict(head.schemas)
        full[key] = value
        if schema is not None:
            schemas[key] = schema
        return full, schemas, [key]

    return await _write(
        session,
        keyring,
        principal,
        env,
        kind="put",
        message=message,
        mutate=mutate,
        ip=ip,
        max_value_bytes=max_value_bytes,
        details={},
    )


async def patch_key(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    env: Environment,
    key: str,
    ops: Any,
    *,
    message: str,
    if_match: str | None,
    ip: str | None,
    max_value_bytes: int,
) -> Committed:
    """Apply an RFC 6902 patch to one key's value; the schema is checked on the result."""

    def mutate(head: State) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        _if_match(head, key, if_match)
        full = head.full()
        if key not in full:
            raise NotFound(f"no key {key!r}")
        try:
            full[key] = docs.apply_patch(full[key], ops)
        except docs.PatchFailed as exc:
            raise Problem(str(exc), status=422, slug="patch-failed", title="Patch failed") from None
        return full, dict(head.schemas), [key]

    return await _write(
        session,
        keyring,
        principal,
        env,
        kind="patch",
        message=message,
        mutate=mutate,
        ip=ip,
        max_value_bytes=max_value_bytes,
        details={},
    )


async def delete_key(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    env: Environment,
    key: str,
    *,
    if_match: str | None,
    ip: str | None,
    max_value_bytes: int,
) -> Committed:
    def mutate(head: State) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        _if_match(head, key, if_match)
        full, schemas = head.full(), dict(head.schemas)
        if key not in full:
            raise NotFound(f"no key {key!r}")
        del full[key]
        schemas.pop(key, None)
        return full, schemas, [key]

    return await _write(
        session,
        keyring,
        principal,
        env,
        kind="delete",
        message=f"delete {key}",
        mutate=mutate,
        ip=ip,
        max_value_bytes=max_value_bytes,
        details={},
    )


def _changed(old: State, full: dict[str, Any], schemas: dict[str, Any]) -> list[str]:
    before = old.full()
    keys = set(before) | set(full)
    return sorted(
        k
        for k in keys
        if docs.canonical([before.get(k), old.schemas.get(k)])
        != docs.canonical([full.get(k), schemas.get(k)])
    )


async def rollback(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    env: Environment,
    to_revision: int,
    *,
    message: str,
    ip: str | None,
    max_value_bytes: int,
) -> Committed:
    """A new version whose content equals revision `to_revision`."""
    if not 1 <= to_revision <= env.revision:
        raise ValidationFailed(
            "no such revision to roll back to",
            errors=[{"pointer": "/to_revision", "message": f"between 1 and {env.revision}"}],
        )
    target = await state_of(
        session, keyring, principal.tenant_id, env.id, to_revision, with_secrets=True
    )
    full, schemas = target.full(), dict(target.schemas)

    def mutate(head: State) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        return full, schemas, _changed(head, full, schemas)

    return await _write(
        session,
        keyring,
        principal,
        env,
        kind="rollback",
        message=message or f"rollback to revision {to_revision}",
        mutate=mutate,
        ip=ip,
        max_value_bytes=max_value_bytes,
        details={"to_revision": to_revision},
    )


async def promote(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    source: Environment,
    target: Environment,
    keys: list[str] | None,
    *,
    message: str,
    ip: str | None,
    max_value_bytes: int,
) -> Committed:
    """Copy `keys` (all when None) with their schemas from `source` to `target`, as one version."""
    if source.id == target.id:
        raise ValidationFailed(
            "promote to another environment",
            errors=[{"pointer": "/to", "message": "same as the source"}],
        )
    origin = await state_of(
        session, keyring, principal.tenant_id, source.id, source.revision, with_secrets=True
    )
    taken = origin.full()
    wanted = sorted(taken) if keys is None else keys
    missing = [k for k in wanted if k not in taken]
    if missing:
        raise ValidationFailed(
            "keys missing in the source environment",
            errors=[{"pointer": "/keys", "message": f"no key {k!r}"} for k in missing],
        )

    def mutate(head: State) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        full, schemas = head.full(), dict(head.schemas)
        for key in wanted:
            full[key] = taken[key]
            if key in origin.schemas:
                schemas[key] = origin.schemas[key]
            else:
                schemas.pop(key, None)
        return full, schemas, _changed(head, full, schemas)

    return await _write(
        session,
        keyring,
        principal,
        target,
        kind="promote",
        message=message or f"promote from {source.name} at revision {source.revision}",
        mutate=mutate,
        ip=ip,
        max_value_bytes=max_value_bytes,
        details={"from": source.id, "from_revision": source.revision},
    )


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
        _audit(
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
    _audit(
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
    _audit(session, principal, "config.client_key_revoked", ("client_key", key_id), ip)
