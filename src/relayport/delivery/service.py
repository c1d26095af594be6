"""Endpoints and event types as a tenant manages them: create, change, read secrets, rotate,
delete. Takes a session, never commits, knows nothing of HTTP.

Messages and their deliveries are in `messages`; sending is in `sender`.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.core import audit
from relayport.core.auth.principal import Principal
from relayport.core.crypto import DecryptionError, KeyRing
from relayport.core.db import utcnow
from relayport.core.errors import Conflict, NotFound, Problem, ValidationFailed
from relayport.core.http import AddressPolicy, ForbiddenAddress, ForbiddenURL, HostNotResolved
from relayport.core.ids import new_id
from relayport.delivery import catalog, repository, signing
from relayport.delivery.models import Endpoint, EventType
from relayport.delivery.secrets import StoredSecret, open_secrets, seal
from relayport.settings import DeliverySettings

log = logging.getLogger("relayport.delivery")

MAX_SECRETS = 5


def _invalid(pointer: str, message: str, code: str) -> ValidationFailed:
    return ValidationFailed(
        message, errors=[{"pointer": pointer, "location": "body", "message": message, "code": code}]
    )


async def check_url(settings: DeliverySettings, url: str, pointer: str) -> None:
    """Refuse URLs the SSRF guard would refuse at send time (after DNS), as 422."""
    policy = AddressPolicy(settings.allow_cidrs)
    try:
        await policy.check_url_resolved(url, require_https=True)
    except ForbiddenAddress as exc:
        raise Problem(
            f"the URL reaches a forbidden address ({exc.reason})",
            status=422,
            slug="endpoint-url-forbidden",
            title="Endpoint URL refused",
            pointer=pointer,
            reason=exc.reason,
        ) from None
    except ForbiddenURL as exc:
        raise Problem(
            f"the URL is refused ({exc.reason})",
            status=422,
            slug="endpoint-url-forbidden",
            title="Endpoint URL refused",
            pointer=pointer,
            reason=exc.reason,
        ) from None
    except HostNotResolved:
        raise Problem(
            "the URL's host does not resolve",
            status=422,
            slug="endpoint-url-unresolvable",
            title="Endpoint URL does not resolve",
            pointer=pointer,
        ) from None


def _check_secret(value: str) -> str:
    try:
        signing.secret_key(value)
    except signing.InvalidSecret as exc:
        raise _invalid("/secret", str(exc), "bad_secret") from None
    return value


async def create_endpoint(
    session: AsyncSession,
    keyring: KeyRing,
    settings: DeliverySettings,
    principal: Principal,
    fields: dict[str, Any],
    *,
    ip: str | None,
) -> tuple[Endpoint, str]:
    """Create an endpoint; returns it with its signing secret (generated unless given)."""
    await check_url(settings, fields["url"], "/url")
    for index, url in enumerate(fields.get("fallback_urls") or []):
        await check_url(settings, url, f"/fallback_urls/{index}")
    secret = _check_secret(fields.pop("secret", None) or signing.generate_secret())
    with_ed25519 = fields.pop("ed25519", False)
    now = utcnow()
    endpoint = Endpoint(
        id=new_id("ep"),
        tenant_id=principal.tenant_id,
        circuit_state="closed",
        disabled_reason=None if fields.get("enabled", True) else "manual",
        created_at=now,
        updated_at=now,
        **fields,
    )
    stored = [StoredSecret(secret, now, None)]
    if with_ed25519:
        seed, public = signing.generate_ed25519()
        stored.append(StoredSecret(seed, now, None))
        endpoint.ed25519_public_key = public
    seal(keyring, endpoint, stored)
    repository.EndpointRepository(session, principal.tenant_id).add(endpoint)
    await _changed(session, principal.tenant_id)
    _audit(session, principal, "endpoint.created", endpoint.id, ip)
    return endpoint, secret


async def update_endpoint(
    session: AsyncSession,
    settings: DeliverySettings,
    principal: Principal,
    endpoint_id: str,
    changes: dict[str, Any],
    *,
    ip: str | None,
) -> Endpoint:
    """Apply a PATCH body's set fields; enabling clears `disabled_reason` and the failure clock."""
    endpoint = await repository.EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    if changes.get("url") is not None:
        await check_url(settings, changes["url"], "/url")
    for index, url in enumerate(changes.get("fallback_urls") or []):
        await check_url(settings, url, f"/fallback_urls/{index}")
    nullable = {"filter_types", "channels", "rate_limit_per_s", "retry_schedule_s"}
    for name, value in changes.items():
        if value is None and name not in nullable:
            continue
        setattr(endpoint, name, value)
    if changes.get("enabled") is True:
        endpoint.disabled_reason = None
        endpoint.failing_since = None
        endpoint.circuit_state = "closed"
        endpoint.circuit_until = None
    elif changes.get("enabled") is False:
        endpoint.disabled_reason = "manual"
    endpoint.updated_at = utcnow()
    await _changed(session, principal.tenant_id)
    _audit(session, principal, "endpoint.updated", endpoint.id, ip, {"fields": sorted(changes)})
    return endpoint


async def delete_endpoint(
    session: AsyncSession, principal: Principal, endpoint_id: str, *, ip: str | None
) -> None:
    endpoint = await repository.EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    await repository.delete_endpoint_rows(session, endpoint.id)
    await _changed(session, principal.tenant_id)
    _audit(session, principal, "endpoint.deleted", endpoint.id, ip)


async def endpoint_secrets(
    session: AsyncSession, keyring: KeyRing, principal: Principal, endpoint_id: str
) -> tuple[Endpoint, list[str]]:
    """The active HMAC secrets, newest first (operators only, at the route)."""
    endpoint = await repository.EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    now = utcnow()
    try:
        stored = open_secrets(keyring, endpoint)
    except DecryptionError:
        raise Conflict(
            "the endpoint's secrets cannot be decrypted (master key missing); rotate them",
            slug="secret-unreadable",
        ) from None
    return endpoint, [s.value for s in stored if s.active(now) and not s.is_ed25519]


async def rotate_secret(
    session: AsyncSession,
    keyring: KeyRing,
    settings: DeliverySettings,
    principal: Principal,
    endpoint_id: str,
    *,
    secret: str | None,
    grace_period_s: int | None,
    ip: str | None,
) -> tuple[Endpoint, str]:
    """Add a secret; the current ones keep signing for the grace period, then expire."""
    endpoint = await repository.EndpointRepository(session, principal.tenant_id).get(endpoint_id)
    value = _check_secret(secret or signing.generate_secret())
    grace = settings.secret_grace_s if grace_period_s is None else grace_period_s
    now = utcnow()
    grace_end = now + dt.timedelta(seconds=grace)
    try:
        current = open_secrets(keyring, endpoint)
    except DecryptionError:
        log.error("endpoint secrets unreadable", extra={"event": "delivery.secrets_unreadable"})
        current = []
    kept = [
        StoredSecret(
            s.value,
            s.created_at,
            s.expires_at
            if s.is_ed25519 or (s.expires_at is not None and s.expires_at < grace_end)
            else grace_end,
        )
        for s in current
        if s.active(now) and s.value != value and (grace > 0 or s.is_ed25519)
    ]
    stored = [StoredSecret(value, now, None), *kept]
    if len([s for s in stored if not s.is_ed25519]) > MAX_SECRETS:
        raise Conflict(
            f"an endpoint has at most {MAX_SECRETS} active secrets; wait for one to expire or "
            "rotate with grace_period_s=0",
            slug="too-many-secrets",
        )
    seal(keyring, endpoint, stored)
    endpoint.updated_at = now
    _audit(session, principal, "endpoint.secret_rotated", endpoint.id, ip, {"grace_s": grace})
    return endpoint, value


async def _changed(session: AsyncSession, tenant_id: str) -> None:
    """Move the tenant's fan-out version (see `catalog`) after writing the endpoint or event
    type rows: endpoint rows first, then the version row, is the order the worker's
    auto-disable takes them too, so the two cannot deadlock."""
    await session.flush()
    await catalog.bump(session, [tenant_id])


def _audit(
    session: AsyncSession,
    principal: Principal,
    action: str,
    target_id: str,
    ip: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    audit.record_by(
        session,
        principal,
        action,
        ip=ip,
        target_type="endpoint" if action.startswith("endpoint") else "event_type",
        target_id=target_id,
        details=details,
    )


async def set_tenant_schedule(
    session: AsyncSession, principal: Principal, schedule: list[float] | None, *, ip: str | None
) -> None:
    """Set (or with None, clear) the tenant's own retry schedule."""
    await catalog.bump(session, [principal.tenant_id])  # creates the row if need be
    await repository.set_tenant_schedule(session, principal.tenant_id, schedule)
    audit.record_by(
        session,
        principal,
        "delivery.settings_updated",
        ip=ip,
        target_type="tenant",
        target_id=principal.tenant_id,
        details={"retry_schedule_s": schedule},
    )


# --- event types ------------------------------------------------------------------------------


def _check_schema(schema: dict[str, Any] | None) -> None:
    if schema is None:
        return
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise _invalid(
            "/schema", f"not a valid JSON Schema: {exc.message}"[:500], "bad_schema"
        ) from None
    except Exception:
        raise _invalid("/schema", "not a usable JSON Schema", "bad_schema") from None


async def create_event_type(
    session: AsyncSession,
    principal: Principal,
    *,
    name: str,
    description: str,
    schema: dict[str, Any] | None,
    ip: str | None,
) -> EventType:
    _check_schema(schema)
    repo = repository.EventTypeRepository(session, principal.tenant_id)
    if await repo.by_name(name) is not None:
        raise Conflict(f"event type {name!r} exists", slug="event-type-exists")
    now = utcnow()
    event_type = EventType(
        id=new_id("evt"),
        tenant_id=principal.tenant_id,
        name=name,
        description=description,
        schema=schema,
        created_at=now,
        updated_at=now,
    )
    repo.add(event_type)
    await _changed(session, principal.tenant_id)
    _audit(session, principal, "event_type.created", event_type.id, ip, {"name": name})
    return event_type


async def get_event_type(session: AsyncSession, tenant_id: str, name: str) -> EventType:
    found = await repository.EventTypeRepository(session, tenant_id).by_name(name)
    if found is None:
        raise NotFound(repository.EventTypeRepository.not_found_detail)
    return found


async def update_event_type(
    session: AsyncSession,
    principal: Principal,
    name: str,
    changes: dict[str, Any],
    *,
    ip: str | None,
) -> EventType:
    event_type = await get_event_type(session, principal.tenant_id, name)
    if "schema_" in changes:
        _check_schema(changes["schema_"])
        event_type.schema = changes["schema_"]
    if changes.get("description") is not None:
        event_type.description = changes["description"]
    event_type.updated_at = utcnow()
    await _changed(session, principal.tenant_id)
    _audit(session, principal, "event_type.updated", event_type.id, ip)
    return event_type


async def delete_event_type(
    session: AsyncSession, principal: Principal, name: str, *, ip: str | None
) -> None:
    event_type = await get_event_type(session, principal.tenant_id, name)
    await session.delete(event_type)
    await _changed(session, principal.tenant_id)
    _audit(session, principal, "event_type.deleted", event_type.id, ip, {"name": name})
