"""Wire shapes of the identity API. Token responses use OAuth 2.0's field names."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, EmailStr, Field

from relayport.core.schemas import Name, Strict

Role = Literal["viewer", "operator", "admin"]


class SignupRequest(Strict):
    email: EmailStr = Field(max_length=320)
    password: str = Field(min_length=10, max_length=1024)
    tenant_name: Name | None = None


class LoginRequest(Strict):
    email: EmailStr = Field(max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class RefreshRequest(Strict):
    refresh_token: str = Field(min_length=1, max_length=200)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105  (a scheme name, not a secret)
    expires_in: int
    refresh_token: str
    refresh_token_expires_in: int


class TenantOut(BaseModel):
    id: str
    name: str
    plan: str
    created_at: dt.datetime


class PingResponse(BaseModel):
    status: str
    principal: str
    tenant_id: str


class UserOut(BaseModel):
    id: str
    tenant_id: str
    email: str
    role: Role
    is_active: bool
    created_at: dt.datetime
    last_login_at: dt.datetime | None


class SignupResponse(TokenResponse):
    user: UserOut
    tenant: TenantOut


class MeResponse(BaseModel):
    kind: Literal["user", "api_key"]
    id: str
    role: Role
    tenant: TenantOut


class UserUpdate(Strict):
    role: Role | None = None
    is_active: bool | None = None


class ApiKeyCreate(Strict):
    name: Name
    role: Role = "viewer"
    expires_in_s: int | None = Field(default=None, gt=0, le=10 * 365 * 86400)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    role: Role
    created_by: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret. Shown only in this response.")
