"""Sources and the inbox as an operator sees them: create, change, rotate secrets, delete, read
events and jobs, retry and replay. Takes a session, never commits, knows nothing of HTTP.

The public ingest path is in `intake`; running jobs is in `jobs`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core import audit
from relayport.core.auth.principal import Principal
from relayport.core.crypto import DecryptionError, KeyRing
from relayport.core.db import utcnow
from relayport.core.errors import Conflict, ValidationFailed
from relayport.core.ids import new_id
from relayport.core.outbox import enqueue
from relayport.ingest import events, handlers, repository, signatures
from relayport.ingest.job_repository import EventToRun
from relayport.ingest.models import InboxEvent, Job, Source
from relayport.ingest.schemas import MAX_SECRETS, HmacConfigIn
from relayport.ingest.secrets import StoredSecret, check_secrets, iso, open_secrets, seal

log = logging.getLogger("relayport.ingest")

QUEUE = "ingest.jobs"
_SCHEMES_NEEDING_JSON = frozenset({"github", "stripe", "standard", "shopify"})


def needs_json(scheme: str, type_pointer: str | None) -> bool:
    """Schemes whose type or dedup key lives in a JSON body (Slack also posts forms)."""
    return scheme in _SCHEMES_NEEDING_JSON or (scheme == "hmac" and type_pointer is not None)


def _invalid(pointer: str, message: str, code: str) -> ValidationFailed:
    return ValidationFailed(
        message, errors=[{"pointer": pointer, "location": "body", "message": message, "code": code}]
    )


def _apply_hmac(source: Source, config: HmacConfigIn | None) -> None:
    if config is not None:
        try:
            signatures.HmacConfig(
                header=config.header,
                algorithm=config.algorithm,
                encoding=config.encoding,
                prefix=config.prefix,
                timestamp_header=config.timestamp_header,
            )
        except ValueError as exc:
            raise _invalid("/hmac", str(exc), "bad_hmac_config") from None
    source.hmac_header = config.header.lower() if config else None
    source.hmac_algorithm = config.algorithm if config else None
    source.hmac_encoding = config.encoding if config else None
    source.hmac_prefix = config.prefix if config else None
    ts_header = config.timestamp_header if config else None
    source.hmac_timestamp_header = ts_header.lower() if ts_header else None


def _check_handler(name: str) -> None:
    if handlers.get(name) is None:
        raise _invalid("/handler", f"no handler named {name!r}", "unknown_handler")


def _check_pointer(pointer: str | None) -> None:
    if pointer is not None:
        try:
            events.validate_pointer(pointer)
        except ValueError as exc:
            raise _invalid("/type_pointer", str(exc), "bad_pointer") from None


# --- sources ----------------------------------------------------------------------------------


async def create_source(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    *,
    name: str,
    scheme: str,
    secrets: Sequence[str] | None,
    tolerance_s: int,
    body_limit_bytes: int,
    hmac: HmacConfigIn | None,
    type_pointer: str | None,
    handler: str,
    max_attempts: int,
    enabled: bool,
    ip: str | None,
) -> tuple[Source, list[StoredSecret]]:
    """Create a source; returns it with its secrets (generated when none are given)."""
    values = check_secrets(scheme, secrets or [signatures.generate_secret(scheme)])
    _check_handler(handler)
    _check_pointer(type_pointer)
    now = utcnow()
    source = Source(
        id=new_id("src"),
        tenant_id=principal.tenant_id,
        name=name,
        scheme=scheme,
        tolerance_s=tolerance_s,
        body_limit_bytes=body_limit_bytes,
        type_pointer=type_pointer,
        handler=handler,
        max_attempts=max_attempts,
        enabled=enabled,
        created_at=now,
        updated_at=now,
    )
    _apply_hmac(source, hmac)
    stored = [StoredSecret(v, now, None) for v in values]
    seal(keyring, source, stored)
    repository.SourceRepository(session, principal.tenant_id).add(source)
    _audit(session, principal, "source.created", source.id, ip, {"scheme": scheme, "name": name})
    return source, stored


async def update_source(
    session: AsyncSession,
    principal: Principal,
    source_id: str,
    changes: dict[str, Any],
    *,
    ip: str | None,
) -> Source:
    """Apply the fields present in `changes` (a PATCH body's set fields)."""
    source = await repository.SourceRepository(session, principal.tenant_id).get(source_id)
    if "hmac" in changes:
        if (source.scheme == "hmac") != (changes["hmac"] is not None):
            raise _invalid("/hmac", "`hmac` is required for scheme hmac only", "bad_hmac_config")
        _apply_hmac(source, changes["hmac"])
    if changes.get("handler") is not None:
        _check_handler(changes["handler"])
    if "type_pointer" in changes:
        _check_pointer(changes["type_pointer"])
        source.type_pointer = changes["type_pointer"]
    for field in ("name", "tolerance_s", "body_limit_bytes", "handler", "max_attempts", "enabled"):
        if changes.get(field) is not None:
            setattr(source, field, changes[field])
    source.updated_at = utcnow()
    _audit(session, principal, "source.updated", source.id, ip, {"fields": sorted(changes)})
    return source


async def rotate_secret(
    session: AsyncSession,
    keyring: KeyRing,
    principal: Principal,
    source_id: str,
    *,
    secret: str | None,
    grace_period_s: int,
    ip: str | None,
) -> tuple[Source, str]:
    """Add a secret; the current ones keep verifying for `grace_period_s`, then expire."""
    source = await repository.SourceRepository(session, principal.tenant_id).get(source_id)
    value = check_secrets(source.scheme, [secret or signatures.generate_secret(source.scheme)])[0]
    now = utcnow()
    grace_end = now + dt.timedelta(seconds=grace_period_s)
    try:
        current = open_secrets(keyring, source)
    except DecryptionError:
        # Unreadable (its master key left the ring): rotation is how an operator recovers.
        log.error("source secrets unreadable", extra={"event": "ingest.secrets_unreadable"})
        current = []
    kept = [
        StoredSecret(
            s.value,
            s.created_at,
            grace_end if s.expires_at is None or s.expires_at > grace_end else s.expires_at,
        )
        for s in current
        if s.active(now) and s.value != value and grace_period_s > 0
    ]
    stored = [StoredSecret(value, now, None), *kept]
    if len(stored) > MAX_SECRETS:
        raise Conflict(
            f"a source has at most {MAX_SECRETS} active secrets; wait for one to expire or "
            "rotate with grace_period_s=0",
            slug="too-many-secrets",
        )
    seal(keyring, source, stored)
    source.updated_at = now
    _audit(session, principal, "source.secret_rotated", source.id, ip, {"grace_s": grace_period_s})
    return source, value


async def delete_source(
    session: AsyncSession, principal: Principal, source_id: str, *, ip: str | None
) -> None:
    """Delete a source with its inbox, jobs and rejections."""
    source = await repository.SourceRepository(session, principal.tenant_id).get(source_id)
    await repository.delete_source_rows(session, source.id)
    _audit(session, principal, "source.deleted", source.id, ip, {"name": source.name})


def _audit(
    session: AsyncSession,
    principal: Principal,
    action: str,
    source_id: str,
    ip: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    audit.record_by(
        session,
        principal,
        action,
        ip=ip,
        target_type="source",
        target_id=source_id,
        details=details,
    )


# --- events and jobs --------------------------------------------------------------------------


def events_query(
    session: AsyncSession,
    tenant_id: str,
    *,
    source_id: str | None,
    type: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> tuple[repository.EventRepository, Select[InboxEvent]]:
    repo = repository.EventRepository(session, tenant_id)
    stmt = repo.listing()
    if source_id is not None:
        stmt = stmt.where(InboxEvent.source_id == source_id)
    if type is not None:
        stmt = stmt.where(InboxEvent.type == type)
    if since is not None:
        stmt = stmt.where(InboxEvent.received_at >= since)
    if until is not None:
        stmt = stmt.where(InboxEvent.received_at < until)
    return repo, stmt


def cloudevent(event: InboxEvent | EventToRun) -> dict[str, Any]:
    """The CloudEvents 1.0 envelope of an inbox event: what handlers receive."""
    try:
        data: Any = events.parse_json(event.body)
        content_type = "application/json"
    except ValueError:
        data = event.body
        content_type = event.headers.get("content-type") or "application/octet-stream"
    return events.to_cloudevent(
        event_id=event.id,
        source=f"/v1/sources/{event.source_id}",
        type=event.type,
        time=event.received_at,
        subject=event.subject,
        data=data,
        datacontenttype=content_type,
    )


def readable_body(body: bytes) -> Any:
    try:
        return events.parse_json(body)
    except ValueError:
        return body.decode("utf-8", "replace")


async def retry_job(
    session: AsyncSession, principal: Principal, job_id: str, *, ip: str | None
) -> Job:
    """Send a finished job (succeeded or dead) round again, with a fresh attempt budget."""
    job = await repository.JobRepository(session, principal.tenant_id).get(job_id)
    source = await repository.SourceRepository(session, principal.tenant_id).get(job.source_id)
    moved = await repository.rerun_jobs(
        session,
        tenant_id=principal.tenant_id,
        now=utcnow(),
        max_attempts=source.max_attempts,
        job_id=job.id,
    )
    if not moved:
        raise Conflict(f"the job is {job.status}; only finished jobs are retried", slug="job-busy")
    _enqueue(session, moved, principal.tenant_id)
    audit.record_by(
        session,
        principal,
        "job.retried",
        ip=ip,
        target_type="job",
        target_id=job.id,
    )
    await session.refresh(job)
    return job


async def replay_source(
    session: AsyncSession,
    principal: Principal,
    source_id: str,
    *,
    since: dt.datetime | None,
    ip: str | None,
) -> int:
    """Run the source's handler again for its inbox events received since `since` (all when
    None). Jobs still queued, running or retrying are left to finish; returns how many went."""
    source = await repository.SourceRepository(session, principal.tenant_id).get(source_id)
    moved = await repository.rerun_jobs(
        session,
        tenant_id=principal.tenant_id,
        now=utcnow(),
        max_attempts=source.max_attempts,
        source_id=source.id,
        since=since,
    )
    _enqueue(session, moved, principal.tenant_id)
    _audit(
        session,
        principal,
        "source.replayed",
        source.id,
        ip,
        {"since": iso(since), "jobs": len(moved)},
    )
    return len(moved)


def _enqueue(session: AsyncSession, job_ids: Sequence[str], tenant_id: str) -> None:
    for job_id in job_ids:
        enqueue(
            session, topic=QUEUE, payload=job_id.encode(), message_id=job_id, tenant_id=tenant_id
        )
