"""Every table of the platform, imported in one place so Alembic and tests see them all."""

from relayport.configs.models import (
    Ack,
    ClientKey,
    ConfigClient,
    Environment,
    Project,
    Version,
    VersionSecrets,
)
from relayport.core.audit import AuditEvent
from relayport.core.auth.models import ApiKey, RefreshToken, User
from relayport.core.outbox import OutboxMessage
from relayport.core.tenants import Tenant
from relayport.delivery.models import (
    Attempt,
    Delivery,
    Endpoint,
    EventType,
    Message,
    TenantSettings,
)
from relayport.ingest.models import InboxEvent, Job, Rejection, Source

__all__ = [
    "Ack",
    "ApiKey",
    "Attempt",
    "AuditEvent",
    "ClientKey",
    "ConfigClient",
    "Delivery",
    "Endpoint",
    "Environment",
    "EventType",
    "InboxEvent",
    "Job",
    "Message",
    "OutboxMessage",
    "Project",
    "RefreshToken",
    "Rejection",
    "Source",
    "Tenant",
    "TenantSettings",
    "User",
    "Version",
    "VersionSecrets",
]
