"""Source secrets at rest: one KeyRing token of the JSON list of a source's secrets, bound to
"<tenant_id>:<source_id>:secrets" so a token copied to another row does not open; their dates
are kept in clear beside it so that reads never decrypt."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from relayport.core.crypto import KeyRing
from relayport.core.db import utcnow
from relayport.core.errors import ValidationFailed
from relayport.ingest import signatures
from relayport.ingest.models import Source


@dataclass(frozen=True, slots=True)
class StoredSecret:
    value: str
    created_at: dt.datetime
    expires_at: dt.datetime | None

    def active(self, now: dt.datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


def _aad(tenant_id: str, source_id: str) -> bytes:
    return f"{tenant_id}:{source_id}:secrets".encode()


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def seal(keyring: KeyRing, source: Source, secrets: Sequence[StoredSecret]) -> None:
    """Store the secrets as one sealed token, and their dates (never values) in clear."""
    dates = [{"created_at": iso(s.created_at), "expires_at": iso(s.expires_at)} for s in secrets]
    plain = [{"value": s.value, **d} for s, d in zip(secrets, dates, strict=True)]
    source.secrets_token = keyring.encrypt(orjson.dumps(plain), _aad(source.tenant_id, source.id))
    source.secrets_meta = dates


def open_secrets(keyring: KeyRing, source: Source) -> list[StoredSecret]:
    """The source's secrets, newest first; raises DecryptionError for a token that won't open."""
    raw = orjson.loads(keyring.decrypt(source.secrets_token, _aad(source.tenant_id, source.id)))
    return [
        StoredSecret(
            value=item["value"],
            created_at=dt.datetime.fromisoformat(item["created_at"]),
            expires_at=dt.datetime.fromisoformat(item["expires_at"])
            if item.get("expires_at")
            else None,
        )
        for item in raw
    ]


def secret_info(source: Source, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """The active secrets' dates for responses (expired ones are gone for good)."""
    now = now or utcnow()
    out = []
    for item in source.secrets_meta:
        expires = dt.datetime.fromisoformat(item["expires_at"]) if item["expires_at"] else None
        if expires is None or expires > now:
            out.append(
                {"created_at": dt.datetime.fromisoformat(item["created_at"]), "expires_at": expires}
            )
    return out


def check_secrets(scheme: str, values: Sequence[str]) -> list[str]:
    """The values, without repeats, once each is known to suit the scheme (else 422)."""
    for index, value in enumerate(values):
        try:
            signatures.validate_secret(scheme, value)
        except signatures.SignatureError:
            raise ValidationFailed(
                "a secret is not usable with this scheme",
                errors=[
                    {
                        "pointer": f"/secrets/{index}",
                        "location": "body",
                        "message": f"not a valid {scheme} secret",
                        "code": "bad_secret",
                    }
                ],
            ) from None
    return list(dict.fromkeys(values))
