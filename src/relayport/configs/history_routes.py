"""History, verification, propagation and client keys of an environment (read-mostly routes)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from relayport.configs import documents as docs
from relayport.configs import service
from relayport.configs.client_auth import forget
from relayport.configs.deps import ENV, EnvDep
from relayport.configs.models import ClientKey, Version
from relayport.configs.propagation import clients_of, propagation_of, seen_after
from relayport.configs.push import hub_of
from relayport.configs.repository import ClientKeyRepository, VersionRepository
from relayport.configs.schemas import (
    ClientKeyCreate,
    ClientKeyCreated,
    ClientKeyOut,
    ClientOut,
    DiffOut,
    Propagation,
    VerifyOut,
    VersionDetail,
    VersionList,
    VersionOut,
)
from relayport.configs.versions import state_of
from relayport.core.db import utcnow
from relayport.core.deps import (
    Operator,
    PlatformDep,
    SessionDep,
    Viewer,
    after_commit,
    client_ip,
)
from relayport.core.errors import BadRequest, NotFound
from relayport.core.paging import After, Limit
from relayport.core.platform import Platform
from relayport.core.schemas import ListResponse

router = APIRouter(prefix="/v1")
Revision = Annotated[int, Query(ge=0, le=2**31 - 1)]
RevisionPath = Annotated[int, Path(ge=0, le=2**31 - 1)]


def version_out(v: Version) -> VersionOut:
    return VersionOut(
        revision=v.revision,
        kind=v.kind,
        changed_keys=v.changed_keys,
        hash=v.hash,
        previous_hash=v.previous_hash,
        author_type=v.author_type,
        author_id=v.author_id,
        message=v.message,
        created_at=v.created_at,
    )


def _key_out(k: ClientKey) -> ClientKeyOut:
    return ClientKeyOut(
        id=k.id,
        environment_id=k.environment_id,
        name=k.name,
        prefix=k.prefix,
        secrets=k.secrets,
        created_at=k.created_at,
        revoked_at=k.revoked_at,
    )


@router.get(ENV + "/versions", response_model=VersionList, tags=["configs"])
async def list_versions(
    env: EnvDep,
    principal: Viewer,
    session: SessionDep,
    limit: Limit = 50,
    after: Annotated[str | None, Query(max_length=12, pattern=r"^[0-9]+$")] = None,
) -> VersionList:
    """Versions, newest first; `next` is the cursor (a revision) for older ones. Role: viewer."""
    rows = await VersionRepository(session, principal.tenant_id).newest_first(
        env.id, limit=limit, before=int(after) if after else None
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return VersionList(
        data=[version_out(v) for v in rows], next=str(rows[-1].revision) if more else None
    )


@router.get(ENV + "/versions/{revision}", response_model=VersionDetail, tags=["configs"])
async def get_version(
    env: EnvDep,
    revision: RevisionPath,
    request: Request,
    principal: Viewer,
    session: SessionDep,
    platform: PlatformDep,
) -> VersionDetail:
    """One version with its content (secrets as for `GET …/configs`). Role: viewer."""
    version = await VersionRepository(session, principal.tenant_id).at(env.id, revision)
    if version is None:
        raise NotFound(f"no revision {revision}")
    reveal = service.can_read_secrets(principal)
    state = await service.read(
        session,
        platform.keyring,
        principal,
        env,
        revision,
        with_secrets=reveal,
        ip=client_ip(request),
    )
    return VersionDetail(
        **version_out(version).model_dump(),
        config=state.full() if reveal else state.stored,
        schemas=state.schemas,
        secrets_revealed=reveal and bool(state.pointers),
    )


@router.get(ENV + "/diff", response_model=DiffOut, tags=["configs"])
async def diff(
    env: EnvDep,
    principal: Viewer,
    session: SessionDep,
    platform: PlatformDep,
    from_: Annotated[int, Query(alias="from", ge=0, le=2**31 - 1)],
    to: Revision,
) -> DiffOut:
    """The JSON Patch from one revision's document to another's. Secrets appear as their
    commitments, so a diff never reveals them. Role: viewer."""
    for revision in (from_, to):
        if revision > env.revision:
            raise BadRequest(f"no revision {revision}", slug="unknown-revision")
    old = await state_of(
        session, platform.keyring, principal.tenant_id, env.id, from_, with_secrets=False
    )
    new = await state_of(
        session, platform.keyring, principal.tenant_id, env.id, to, with_secrets=False
    )
    return DiffOut(from_=from_, to=to, patch=docs.diff(old.stored, new.stored))


@router.get(ENV + "/verify", response_model=VerifyOut, tags=["configs"])
async def verify(env: EnvDep, principal: Viewer, session: SessionDep) -> VerifyOut:
    """Recompute every version's hash and check the chain to the head. Role: viewer."""
    problems = await service.verify(session, principal.tenant_id, env)
    return VerifyOut(
        ok=not problems, revision=env.revision, head_hash=env.head_hash, problems=problems
    )


@router.get(ENV + "/versions/{revision}/propagation", response_model=Propagation, tags=["configs"])
async def propagation(
    env: EnvDep,
    revision: RevisionPath,
    principal: Viewer,
    session: SessionDep,
    platform: PlatformDep,
) -> Propagation:
    """Connected clients, how many acknowledged this revision (or a later one), and p50/p99
    from commit to acknowledgement. Role: viewer."""
    return await propagation_of(session, principal.tenant_id, env, revision, _alive(platform))


@router.get(ENV + "/clients", response_model=ListResponse[ClientOut], tags=["configs"])
async def list_clients(
    env: EnvDep,
    principal: Viewer,
    session: SessionDep,
    platform: PlatformDep,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[ClientOut]:
    """Clients of the environment with the revision each acknowledged last; `connected` only
    while the instance holding the client's stream keeps confirming it. Role: viewer."""
    return await clients_of(
        session, principal.tenant_id, env, limit=limit, after=after, alive=_alive(platform)
    )


def _alive(platform: Platform) -> dt.datetime:
    settings = platform.settings.configs
    return seen_after(settings.heartbeat_interval_s, settings.connected_expiry_beats)


@router.post(
    ENV + "/client-keys", status_code=201, response_model=ClientKeyCreated, tags=["configs"]
)
async def create_client_key(
    env: EnvDep, body: ClientKeyCreate, request: Request, principal: Operator, session: SessionDep
) -> ClientKeyCreated:
    """A read-only key for this environment's client API; the key is in this response only.
    `secrets: true` lets it read secret values (every such read is audited). Role: operator."""
    key, plaintext = await service.create_client_key(
        session, principal, env, body.name, body.secrets, ip=client_ip(request)
    )
    await session.flush()
    return ClientKeyCreated(**_key_out(key).model_dump(), key=plaintext)


@router.get(ENV + "/client-keys", response_model=ListResponse[ClientKeyOut], tags=["configs"])
async def list_client_keys(
    env: EnvDep,
    principal: Viewer,
    session: SessionDep,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[ClientKeyOut]:
    """Client keys of the environment (never the keys themselves). Role: viewer."""
    repo = ClientKeyRepository(session, principal.tenant_id)
    stmt = repo.query().where(ClientKey.environment_id == env.id)
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(data=[_key_out(k) for k in page.items], next=page.next)


@router.delete(ENV + "/client-keys/{client_key_id}", status_code=204, tags=["configs"])
async def revoke_client_key(
    env: EnvDep,
    client_key_id: str,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> Response:
    """Revoke a client key: refused from now on (within 5 s on other instances). Role: operator."""
    key = await ClientKeyRepository(session, principal.tenant_id).get(client_key_id)
    if key.environment_id != env.id:
        raise NotFound("no such client key")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        service.audit_key_revoked(session, principal, key.id, ip=client_ip(request))
    key_hash, key_id = key.key_hash, key.id

    def revoked() -> None:  # after the commit, or a reconnect could re-cache the key as valid
        forget(platform, key_hash)
        hub_of(platform).revoke(key_id)  # other instances: at their next heartbeat tick

    after_commit(session, revoked)
    return Response(status_code=204)
