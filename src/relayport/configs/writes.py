"""Every change to an environment's configuration: set, patch, delete, roll back, promote.

Each builds a mutation of the head and hands it to `versions.commit`, the one write path; every
change is audited. Like all services here, these take the request's session and never commit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from relayport.configs import documents as docs
from relayport.configs.models import Environment
from relayport.configs.service import actor_of, audit_action
from relayport.configs.versions import Committed, State, commit, key_etag, state_of
from relayport.core.auth.principal import Principal
from relayport.core.crypto import KeyRing
from relayport.core.errors import NotFound, PreconditionFailed, Problem, ValidationFailed


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
    audit_action(session, principal, f"config.{kind}", ("environment", env.id), ip, details)
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
