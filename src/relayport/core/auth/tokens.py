"""JWT access tokens (PyJWT) and the opaque secrets behind refresh tokens and API keys."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from relayport.core.errors import Unauthorized
from relayport.settings import AuthSettings, Settings

log = logging.getLogger("relayport.auth")

API_KEY_PREFIX = "rp_"
REFRESH_PREFIX = "rpr_"


def random_secret(prefix: str, nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class AccessClaims:
    user_id: str
    tenant_id: str
    role: str
    expires_at: dt.datetime


class TokenIssuer:
    """Signs and verifies access tokens with one algorithm and a `kid` per key."""

    def __init__(self, auth: AuthSettings, *, signing_key: Any, verify_keys: dict[str, Any]):
        self.algorithm = auth.jwt_algorithm
        self.kid = auth.jwt_kid
        self.issuer = auth.jwt_issuer
        self.ttl = auth.access_token_ttl_s
        self._signing_key = signing_key
        self._verify_keys = verify_keys

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenIssuer:
        auth = settings.auth
        if auth.jwt_algorithm == "HS256":
            secret = (
                auth.jwt_secret.get_secret_value().encode()
                if auth.jwt_secret
                else _load_or_create_hs_secret(settings.data_dir)
            )
            return cls(auth, signing_key=secret, verify_keys={auth.jwt_kid: secret})
        assert auth.jwt_private_key_file is not None  # settings validation guarantees it
        private = serialization.load_pem_private_key(
            auth.jwt_private_key_file.read_bytes(), password=None
        )
        if auth.jwt_algorithm == "EdDSA" and not isinstance(private, Ed25519PrivateKey):
            raise ValueError("EdDSA needs an Ed25519 private key")
        if auth.jwt_algorithm == "RS256" and not isinstance(private, RSAPrivateKey):
            raise ValueError("RS256 needs an RSA private key")
        return cls(auth, signing_key=private, verify_keys={auth.jwt_kid: private.public_key()})

    def issue(self, *, user_id: str, tenant_id: str, role: str) -> tuple[str, int]:
        now = dt.datetime.now(dt.UTC)
        claims = {
            "iss": self.issuer,
            "sub": user_id,
            "tid": tenant_id,
            "role": role,
            "iat": now,
            "nbf": now,
            "exp": now + dt.timedelta(seconds=self.ttl),
            "jti": secrets.token_hex(8),
            "typ": "access",
        }
        token = jwt.encode(
            claims, self._signing_key, algorithm=self.algorithm, headers={"kid": self.kid}
        )
        return token, self.ttl

    def verify(self, token: str) -> AccessClaims:
        """Claims of a valid token; any defect is a 401 without saying which."""
        try:
            header = jwt.get_unverified_header(token)
            key = self._verify_keys.get(str(header.get("kid")))
            # Only the configured algorithm is accepted: `alg: none` and HS/RS confusion fail.
            if key is None or header.get("alg") != self.algorithm:
                raise Unauthorized("invalid access token", slug="invalid-token")
            claims = jwt.decode(
                token,
                key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub", "iss"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("access token expired", slug="token-expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("invalid access token", slug="invalid-token") from exc
        if claims.get("typ") != "access" or not isinstance(claims.get("tid"), str):
            raise Unauthorized("invalid access token", slug="invalid-token")
        return AccessClaims(
            user_id=str(claims["sub"]),
            tenant_id=claims["tid"],
            role=str(claims.get("role", "viewer")),
            expires_at=dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC),
        )


def _load_or_create_hs_secret(data_dir: Path) -> bytes:
    """The embedded default keeps a generated signing secret so tokens survive restarts."""
    path = data_dir / "jwt.key"
    if path.exists():
        return base64.b64decode(json.loads(path.read_text())["secret"])
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    # Write a private temp file completely, then link it into place: a process starting at
    # the same moment either wins the link or reads a complete file, never a half-written one.
    tmp = data_dir / f".jwt.key.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"secret": base64.b64encode(secret).decode()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:  # another process won the race: use its secret
        return base64.b64decode(json.loads(path.read_text())["secret"])
    finally:
        tmp.unlink()
    log.warning(
        "generated a JWT signing secret; set RELAYPORT_AUTH__JWT_SECRET in production",
        extra={"event": "auth.jwt_secret_generated", "path": str(path)},
    )
    return secret
