"""Standard Webhooks signing (pure: no I/O).

`webhook-signature` carries one space-separated `v1,<base64 HMAC-SHA256>` per active secret
(so receivers keep verifying through a rotation) and, for endpoints with an Ed25519 key,
`v1a,<base64 Ed25519 signature>`. Both sign `"<webhook-id>.<webhook-timestamp>.<body>"`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SECRET_PREFIX = "whsec_"  # noqa: S105 - a format prefix, not a secret
ED25519_SECRET_PREFIX = "whsk_"  # noqa: S105 - a format prefix
ED25519_PUBLIC_PREFIX = "whpk_"
SECRET_BYTES = 24


class InvalidSecret(ValueError):
    """Not a `whsec_` secret of 24 to 64 bytes (or a `whsk_` Ed25519 seed)."""


def generate_secret() -> str:
    """`whsec_` + base64 of 24 random bytes, as Standard Webhooks suggests."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def generate_ed25519() -> tuple[str, str]:
    """A new Ed25519 key: (`whsk_` + base64 seed, `whpk_` + base64 public key)."""
    seed = os.urandom(32)
    return ED25519_SECRET_PREFIX + base64.b64encode(seed).decode(), public_key(seed)


def public_key(seed: bytes) -> str:
    raw = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    return ED25519_PUBLIC_PREFIX + base64.b64encode(raw).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret; raises InvalidSecret."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret("a secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("a secret is whsec_ followed by base64") from None
    # Below 24 bytes an HMAC key is guessable in principle; above 64 it is hashed anyway.
    if not 24 <= len(key) <= 64:
        raise InvalidSecret("a secret holds 24 to 64 bytes")
    return key


def ed25519_seed(secret: str) -> bytes:
    try:
        seed = base64.b64decode(secret[len(ED25519_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSecret("not an Ed25519 key") from None
    if not secret.startswith(ED25519_SECRET_PREFIX) or len(seed) != 32:
        raise InvalidSecret("not an Ed25519 key")
    return seed


def _signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sign_v1(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, _signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_v1a(seed: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(
        _signed_content(msg_id, timestamp, body)
    )
    return "v1a," + base64.b64encode(signature).decode()


def signature_header(
    hmac_keys: Sequence[bytes],
    msg_id: str,
    timestamp: int,
    body: bytes,
    *,
    ed25519_seeds: Sequence[bytes] = (),
) -> str:
    """The `webhook-signature` value: every active key's signature, newest first."""
    parts = [sign_v1(key, msg_id, timestamp, body) for key in hmac_keys]
    parts += [sign_v1a(seed, msg_id, timestamp, body) for seed in ed25519_seeds]
    return " ".join(parts)


def headers(
    hmac_keys: Sequence[bytes],
    msg_id: str,
    timestamp: int,
    body: bytes,
    *,
    ed25519_seeds: Sequence[bytes] = (),
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(
            hmac_keys, msg_id, timestamp, body, ed25519_seeds=ed25519_seeds
        ),
    }
