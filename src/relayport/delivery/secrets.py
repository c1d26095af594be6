"""Endpoint secrets at rest: one KeyRing token of the JSON list of an endpoint's signing keys,
bound to "<tenant_id>:<endpoint_id>:secrets" so a token copied to another row does not open;
their dates are kept in clear beside it so that reads never decrypt."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from relayport.core.crypto import KeyRing
from relayport.delivery import signing
from relayport.delivery.models import Endpoint


@dataclass(frozen=True, slots=True)
class StoredSecret:
    value: str
    created_at: dt.datetime
    expires_at: dt.datetime | None

    def active(self, now: dt.datetime) -> bool:
        return self.expires_at is None or self.expires_at > now

    @property
    def is_ed25519(self) -> bool:
        return self.value.startswith(signing.ED25519_SECRET_PREFIX)


def _aad(endpoint: Endpoint) -> bytes:
    return f"{endpoint.tenant_id}:{endpoint.id}:secrets".encode()


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def seal(keyring: KeyRing, endpoint: Endpoint, secrets: Sequence[StoredSecret]) -> None:
    dates = [
        {
            "created_at": _iso(s.created_at),
            "expires_at": _iso(s.expires_at),
            "kind": "ed25519" if s.is_ed25519 else "hmac",
        }
        for s in secrets
    ]
    plain = [{"value": s.value, **d} for s, d in zip(secrets, dates, strict=True)]
    endpoint.secrets_token = keyring.encrypt(orjson.dumps(plain), _aad(endpoint))
    endpoint.secrets_meta = dates


def open_secrets(keyring: KeyRing, endpoint: Endpoint) -> list[StoredSecret]:
    """Newest first; raises DecryptionError for a token that won't open."""
    raw = orjson.loads(keyring.decrypt(endpoint.secrets_token, _aad(endpoint)))
    return [
        StoredSecret(
            item["value"],
            dt.datetime.fromisoformat(item["created_at"]),
            dt.datetime.fromisoformat(item["expires_at"]) if item.get("expires_at") else None,
        )
        for item in raw
    ]


def secret_info(endpoint: Endpoint, now: dt.datetime) -> list[dict[str, Any]]:
    """Dates of the active HMAC secrets, for responses that must not show values."""
    out = []
    for item in endpoint.secrets_meta:
        if item.get("kind") == "ed25519":
            continue
        expires = dt.datetime.fromisoformat(item["expires_at"]) if item["expires_at"] else None
        if expires is None or expires > now:
            out.append(
                {"created_at": dt.datetime.fromisoformat(item["created_at"]), "expires_at": expires}
            )
    return out
