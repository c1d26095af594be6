"""HTTP surface of live configuration: /v1/projects/… (management).

History and client keys are in history_routes, the client API in client_routes.

Routes with ids resolve the project and environment in a dependency, which runs before the body
is validated: another tenant's id is a 404 whatever the body.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.configs import service, writes
from relayport.configs.client_routes import router as client_router
from relayport.configs.deps import ENV, EnvDep, IfMatch, Key, ProjectDep
from relayport.configs.history_routes import router as history_router
from relayport.configs.models import Environment, Project
from relayport.configs.push import announce
from relayport.configs.repository import (
    EnvironmentRepository,
    ProjectRepository,
)
from relayport.configs.schemas import (
    ConfigOut,
    ConfigPut,
    EnvironmentConfig,
    EnvironmentCreate,
    EnvironmentOut,
    ProjectCreate,
    ProjectOut,
    Promote,
    Rollback,
    WriteResult,
)
from relayport.configs.streams import router as stream_router
from relayport.configs.versions import Committed, key_etag
from relayport.core.deps import Operator, PlatformDep, SessionDep, Viewer, client_ip
from relayport.core.errors import NotFound
from relayport.core.paging import After, Limit
from relayport.core.schemas import ListResponse

router = APIRouter(prefix="/v1")


def _project_out(p: Project) -> ProjectOut:
    return ProjectOut(id=p.id, name=p.name, created_at=p.created_at)


def _env_out(e: Environment) -> EnvironmentOut:
    return EnvironmentOut(
        id=e.id,
        project_id=e.project_id,
        name=e.name,
        branched_from=e.branched_from,
        revision=e.revision,
        head_hash=e.head_hash,
        created_at=e.created_at,
    )


def _written(
    request: Request, session: AsyncSession, response: Response, done: Committed, key: str | None
) -> dict[str, Any]:
    announce(request.app.state.platform, session, done)
    etag = key_etag(done.state, key) if key is not None and key in done.state.stored else None
    if etag:
        response.headers["ETag"] = etag
    return {"revision": done.version.revision, "hash": done.version.hash, "etag": etag}


@router.post("/projects", status_code=201, response_model=ProjectOut, tags=["configs"])
async def create_project(
    body: ProjectCreate, request: Request, principal: Operator, session: SessionDep
) -> ProjectOut:
    """Create a project. Role: operator."""
    project = await service.create_project(session, principal, body.name, ip=client_ip(request))
    return _project_out(project)


@router.get("/projects", response_model=ListResponse[ProjectOut], tags=["configs"])
async def list_projects(
    principal: Viewer,
    session: SessionDep,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[ProjectOut]:
    """Projects of the tenant, newest first. Role: viewer."""
    page = await ProjectRepository(session, principal.tenant_id).page(limit=limit, after=after)
    return ListResponse(data=[_project_out(p) for p in page.items], next=page.next)


@router.get("/projects/{project_id}", response_model=ProjectOut, tags=["configs"])
async def get_project(project: ProjectDep) -> ProjectOut:
    """One project. Role: viewer."""
    return _project_out(project)


@router.post(
    "/projects/{project_id}/environments",
    status_code=201,
    response_model=EnvironmentOut,
    tags=["configs"],
)
async def create_environment(
    project: ProjectDep,
    body: EnvironmentCreate,
    request: Request,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> EnvironmentOut:
    """Create an environment, empty or as a branch of another (`from`). Role: operator."""
    env = await service.create_environment(
        session,
        platform.keyring,
        principal,
        project.id,
        body.name,
        body.from_,
        ip=client_ip(request),
        max_value_bytes=platform.settings.configs.max_value_bytes,
    )
    await session.refresh(env)
    return _env_out(env)


@router.get(
    "/projects/{project_id}/environments",
    response_model=ListResponse[EnvironmentOut],
    tags=["configs"],
)
async def list_environments(
    project: ProjectDep,
    principal: Viewer,
    session: SessionDep,
    limit: Limit = 50,
    after: After = None,
) -> ListResponse[EnvironmentOut]:
    """Environments of a project, newest first. Role: viewer."""
    repo = EnvironmentRepository(session, principal.tenant_id)
    stmt = repo.query().where(Environment.project_id == project.id)
    page = await repo.page(stmt, limit=limit, after=after)
    return ListResponse(data=[_env_out(e) for e in page.items], next=page.next)


@router.get(ENV, response_model=EnvironmentOut, tags=["configs"])
async def get_environment(env: EnvDep) -> EnvironmentOut:
    """One environment with its head revision and hash. Role: viewer."""
    return _env_out(env)


@router.get(ENV + "/configs", response_model=EnvironmentConfig, tags=["configs"])
async def get_configs(
    env: EnvDep, request: Request, principal: Viewer, session: SessionDep, platform: PlatformDep
) -> EnvironmentConfig:
    """Every key of the head. Secrets are values for operators (audited), commitments
    (`{"$secret": …}`) for viewers. Role: viewer."""
    reveal = service.can_read_secrets(principal)
    state = await service.read(
        session, platform.keyring, principal, env, None, with_secrets=reveal, ip=client_ip(request)
    )
    return EnvironmentConfig(
        revision=state.revision,
        hash=state.hash,
        configs=state.full() if reveal else state.stored,
        schemas=state.schemas,
        secrets_revealed=reveal and bool(state.pointers),
    )


@router.get(ENV + "/configs/{key}", response_model=ConfigOut, tags=["configs"])
async def get_config(
    env: EnvDep,
    key: Key,
    request: Request,
    response: Response,
    principal: Viewer,
    session: SessionDep,
    platform: PlatformDep,
) -> ConfigOut:
    """One key with its schema and ETag (for `If-Match`). Role: viewer."""
    reveal = service.can_read_secrets(principal)
    state = await service.read(
        session, platform.keyring, principal, env, None, with_secrets=reveal, ip=client_ip(request)
    )
    if key not in state.stored:
        raise NotFound(f"no key {key!r}")
    etag = key_etag(state, key)
    response.headers["ETag"] = etag
    value = state.full()[key] if reveal else state.stored[key]
    return ConfigOut(
        key=key, value=value, schema=state.schemas.get(key), revision=state.revision, etag=etag
    )


@router.put(ENV + "/configs/{key}", response_model=WriteResult, tags=["configs"])
async def put_config(
    env: EnvDep,
    key: Key,
    body: ConfigPut,
    request: Request,
    response: Response,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Set a key (and its JSON Schema), as a new version. `If-Match` makes it conditional:
    412 when the key changed since that ETag. 422 lists every schema violation. Role: operator."""
    done = await writes.put_key(
        session,
        platform.keyring,
        principal,
        env,
        key,
        body.value,
        body.schema_,
        message=body.message,
        if_match=if_match,
        ip=client_ip(request),
        max_value_bytes=platform.settings.configs.max_value_bytes,
    )
    return _written(request, session, response, done, key)


@router.patch(ENV + "/configs/{key}", response_model=WriteResult, tags=["configs"])
async def patch_config(
    env: EnvDep,
    key: Key,
    request: Request,
    response: Response,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
    ops: Annotated[list[dict[str, Any]], Body(description="RFC 6902 JSON Patch.")],
    message: Annotated[str, Query(max_length=1000)] = "",
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Apply an RFC 6902 JSON Patch to a key's value; the schema is checked on the result.
    422 `patch-failed` when an operation does not apply. Role: operator."""
    done = await writes.patch_key(
        session,
        platform.keyring,
        principal,
        env,
        key,
        ops,
        message=message,
        if_match=if_match,
        ip=client_ip(request),
        max_value_bytes=platform.settings.configs.max_value_bytes,
    )
    return _written(request, session, response, done, key)


@router.delete(ENV + "/configs/{key}", response_model=WriteResult, tags=["configs"])
async def delete_config(
    env: EnvDep,
    key: Key,
    request: Request,
    response: Response,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
    if_match: IfMatch = None,
) -> dict[str, Any]:
    """Remove a key, as a new version. Role: operator."""
    done = await writes.delete_key(
        session,
        platform.keyring,
        principal,
        env,
        key,
        if_match=if_match,
        ip=client_ip(request),
        max_value_bytes=platform.settings.configs.max_value_bytes,
    )
    return _written(request, session, response, done, None)


@router.post(ENV + "/rollback", response_model=WriteResult, tags=["configs"])
async def rollback(
    env: EnvDep,
    body: Rollback,
    request: Request,
    response: Response,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> dict[str, Any]:
    """A new version equal to revision `to_revision`. Role: operator."""
    done = await writes.rollback(
        session,
        platform.keyring,
        principal,
        env,
        body.to_revision,
        message=body.message,
        ip=client_ip(request),
        max_value_bytes=platform.settings.configs.max_value_bytes,
    )
    return _written(request, session, response, done, None)


@router.post(ENV + "/promote", response_model=WriteResult, tags=["configs"])
async def promote(
    env: EnvDep,
    body: Promote,
    request: Request,
    response: Response,
    principal: Operator,
    session: SessionDep,
    platform: PlatformDep,
) -> dict[str, Any]:
    """Copy keys (all by default) with their schemas from this environment to `to`, as one
    version of `to`. Role: operator."""
    target = await EnvironmentRepository(session, principal.tenant_id).in_project(
        env.project_id, body.to
    )
    if target is None:
        raise NotFound("no such target environment")
    done = await writes.promote(
        session,
        platform.keyring,
        principal,
        env,
        target,
        body.keys,
        message=body.message,
        ip=client_ip(request),
        max_value_bytes=platform.settings.configs.max_value_bytes,
    )
    return _written(request, session, response, done, None)


router.routes.extend(history_router.routes)
router.routes.extend(client_router.routes)
router.routes.extend(stream_router.routes)
