"""Dependencies of the configs routes: the project and environment named in the path.

They run before the body is validated, so another tenant's id is a 404 whatever the body says.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path

from relayport.configs import service
from relayport.configs.models import Environment, Project
from relayport.configs.repository import ProjectRepository
from relayport.configs.schemas import KEY_PATTERN
from relayport.core.deps import SessionDep, Viewer

ENV = "/projects/{project_id}/environments/{environment_id}"
Key = Annotated[str, Path(pattern=KEY_PATTERN)]
IfMatch = Annotated[str | None, Header(alias="If-Match", max_length=2000)]


async def _project(project_id: str, principal: Viewer, session: SessionDep) -> Project:
    return await ProjectRepository(session, principal.tenant_id).get(project_id)


async def _env(
    project_id: str, environment_id: str, principal: Viewer, session: SessionDep
) -> Environment:
    return await service.environment(session, principal.tenant_id, project_id, environment_id)


ProjectDep = Annotated[Project, Depends(_project)]
EnvDep = Annotated[Environment, Depends(_env)]
