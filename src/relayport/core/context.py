"""Per-request context that logs and traces read without threading it through every call."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
tenant_id_var: ContextVar[str | None] = ContextVar("tenant_id", default=None)
principal_id_var: ContextVar[str | None] = ContextVar("principal_id", default=None)
