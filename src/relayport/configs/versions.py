"""Versions: reading an environment's state and committing a new immutable version of it.

Every write goes through `commit`: it takes the environment's next revision under a lock, builds
the new document from the current head, validates every schema, splits out the secrets
(encrypted under a data key of the version's own), chains the hash and inserts the row. The
caller's transaction commits it; nothing here commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.configs import documents as docs
from relayport.configs.models import Version, VersionSecrets
from relayport.configs.repository import EnvironmentRepository, VersionRepository
from relayport.core.crypto import KeyRing
from relayport.core.db import utcnow
from relayport.core.errors import Problem, ValidationFailed
from relayport.core.ids import new_id


@dataclass
class State:
    """An environment at one revision: stored form, schemas, and (once opened) its secrets."""

    revision: int
    hash: str
    stored: dict[str, Any] = field(default_factory=dict)
    schemas: dict[str, Any] = field(default_factory=dict)
    pointers: list[str] = field(default_factory=list)
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def full(self) -> dict[str, Any]:
        return docs.reveal(self.stored, self.secrets)


@dataclass(frozen=True)
class Actor:
    kind: str
    id: str
    tenant_id: str


def secrets_aad(tenant_id: str, version_id: str) -> bytes:
    return f"{tenant_id}:{version_id}:config-secrets".encode()


def meta_of(version: Version) -> str:
    return docs.meta_digest(
        version.schemas,
        f"{version.author_type}:{version.author_id}",
        version.message,
        version.created_at.isoformat(),
    )


def open_secrets(keyring: KeyRing, version: Version, token: str | None) -> dict[str, Any]:
    if not token:
        return {}
    raw = keyring.decrypt(token, secrets_aad(version.tenant_id, version.id))
    opened: dict[str, Any] = orjson.loads(raw)
    return opened


async def state_of(
    session: AsyncSession,
    keyring: KeyRing,
    tenant_id: str,
    env_id: str,
    revision: int,
    *,
    with_secrets: bool,
) -> State:
    """The environment at `revision` (0: the empty state before the first version)."""
    if revision == 0:
        return State(0, "")
    repo = VersionRepository(session, tenant_id)
    version = await repo.at(env_id, revision)
    if version is None:
        raise Problem(f"no revision {revision}", status=404, slug="not-found", title="Not found")
    return await state_from(session, keyring, version, with_secrets=with_secrets)


async def state_from(
    session: AsyncSession, keyring: KeyRing, version: Version, *, with_secrets: bool
) -> State:
    secrets: dict[str, Any] = {}
    if with_secrets and version.secret_pointers:
        token = await VersionRepository(session, version.tenant_id).secrets_token(version.id)
        secrets = open_secrets(keyring, version, token)
    return State(
        version.revision,
        version.hash,
        dict(version.document),
        dict(version.schemas),
        list(version.secret_pointers),
        secrets,
    )


def key_etag(state: State, key: str) -> str:
    """Content ETag of one key: stable while its stored value and schema stay the same."""
    body = {"s": state.schemas.get(key), "v": state.stored.get(key)}
    return '"' + docs.sha256_hex(docs.canonical(body))[:32] + '"'


def check(schema: Any, value: Any, key: str) -> None:
    """422 listing every violation (pointers into the value) or every schema error."""
    errors = docs.schema_errors(schema)
    if errors:
        raise ValidationFailed(
            f"the schema of {key!r} is not a valid JSON Schema",
            errors=[{**e, "location": "schema"} for e in errors],
        )
    found = docs.violations(schema, value)
    if found:
        raise ValidationFailed(
            f"the value of {key!r} does not match its schema ({len(found)} violations)",
            errors=[{**e, "location": "value"} for e in found],
        )


# A mutation takes the full head (secrets revealed) and returns the new full document, schemas,
# the keys it changed and the version kind.
Mutation = Callable[[State], tuple[dict[str, Any], dict[str, Any], list[str]]]


@dataclass(frozen=True)
class Committed:
    version: Version
    state: State
    # The stored form (secrets as commitments) of the version before: the public patch that
    # announces this version to other processes is computed against it.
    previous_stored: dict[str, Any] = field(default_factory=dict)


async def commit(
    session: AsyncSession,
    keyring: KeyRing,
    *,
    tenant_id: str,
    env_id: str,
    actor: Actor,
    kind: str,
    message: str,
    mutate: Mutation,
    max_value_bytes: int,
) -> Committed:
    """Append the next version of an environment; see the module docstring."""
    envs = EnvironmentRepository(session, tenant_id)
    revision, previous_hash = await envs.advance(env_id)
    head = await state_of(session, keyring, tenant_id, env_id, revision - 1, with_secrets=True)
    full, schemas, changed = mutate(head)
    pointers: list[str] = []
    for key, value in full.items():
        try:
            size = len(docs.canonical([value, schemas.get(key)]))
        except ValueError:  # NaN or Infinity: JSON has no spelling for them
            raise ValidationFailed(
                f"{key!r} holds a number JSON cannot represent (NaN or Infinity)",
                errors=[{"pointer": "/value", "message": "not JSON-compliant"}],
            ) from None
        if size > max_value_bytes:
            raise Problem(
                f"the value of {key!r} is over {max_value_bytes} bytes",
                status=413,
                slug="config-value-too-large",
                title="Configuration value too large",
            )
        schema = schemas.get(key)
        if schema is not None:
            if key in changed:
                check(schema, value, key)
            pointers += ["/" + docs.escape(key) + p for p in docs.secret_pointers(schema, value)]
    stored, secrets = docs.split_secrets(full, pointers, head.secrets)
    version = Version(
        id=new_id("cfv"),
        tenant_id=tenant_id,
        environment_id=env_id,
        revision=revision,
        document=stored,
        schemas=schemas,
        secret_pointers=sorted(secrets),
        kind=kind,
        changed_keys=sorted(changed),
        previous_hash=previous_hash,
        author_type=actor.kind,
        author_id=actor.id,
        message=message,
        created_at=utcnow(),
        hash="",
    )
    version.hash = docs.version_hash(previous_hash, revision, stored, meta_of(version))
    session.add(version)
    if secrets:
        token = keyring.encrypt(orjson.dumps(secrets), secrets_aad(tenant_id, version.id))
        session.add(VersionSecrets(id=version.id, tenant_id=tenant_id, token=token))
    await session.flush()
    await envs.set_head(env_id, version.hash)
    state = State(revision, version.hash, stored, schemas, sorted(secrets), secrets)
    return Committed(version, state, head.stored)


def chain_problems(versions: list[Version]) -> list[dict[str, Any]]:
    """Every break in a chain of versions (oldest first, from revision 1)."""
    problems: list[dict[str, Any]] = []
    previous = ""
    for expected, version in enumerate(versions, start=1):
        if version.revision != expected:
            problems.append({"revision": version.revision, "problem": f"expected {expected}"})
        if version.previous_hash != previous:
            problems.append({"revision": version.revision, "problem": "previous hash differs"})
        computed = docs.version_hash(
            version.previous_hash, version.revision, version.document, meta_of(version)
        )
        if computed != version.hash:
            problems.append({"revision": version.revision, "problem": "content hash differs"})
        previous = version.hash
    return problems
