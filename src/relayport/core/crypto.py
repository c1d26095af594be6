"""Encryption at rest: AES-256-GCM envelope encryption, a key ring that rotates without downtime.

Each record gets a fresh 32-byte data key (DEK). The plaintext is sealed with the DEK, the DEK is
sealed (wrapped) with the active master key, and the two travel together as one ASCII token::

    v1.<kid>.<b64url(nonce ‖ wrapped DEK ‖ tag)>.<b64url(nonce ‖ ciphertext ‖ tag)>

base64url without padding; every nonce is 12 random bytes. The wrap is bound to `v1.<kid>` (so a
token cannot be relabelled to another version or key) and the data to `v1.` + the caller's `aad`
(tenant id, column name, ...), so a token copied to another row fails. The data part does not
depend on the master key: `KeyRing.rewrap` re-seals only the DEK, which is what lets rotation run
row by row while old keys stay in the ring for reading.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from relayport.settings import Settings

log = logging.getLogger("relayport.crypto")

KEY_BYTES = 32
_NONCE = 12
_TAG = 16
_VERSION = "v1"
_WRAP_BYTES = _NONCE + KEY_BYTES + _TAG
_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no "." so the token splits unambiguously
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
KEY_FILE = "master.key"


class DecryptionError(Exception):
    """A token that cannot be opened: malformed, tampered, wrong aad, or an unknown key id."""


def generate_master_key() -> str:
    """Base64 of 32 random bytes: a value for `RELAYPORT_CRYPTO__MASTER_KEYS__<kid>`."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise DecryptionError("malformed token")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise DecryptionError("malformed token") from None
    # Unused low bits in the last character would give several spellings of one token.
    if _b64e(raw) != text:
        raise DecryptionError("malformed token")
    return raw


def _derive(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(key)


def _decode_master_key(kid: str, value: str) -> bytes:
    """Standard or urlsafe base64, padding optional; errors name the kid, never the key."""
    text = "".join(value.split()).replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"crypto master key {kid!r} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(
            f"crypto master key {kid!r} decodes to {len(raw)} bytes, expected {KEY_BYTES}"
        )
    return raw


class KeyRing:
    """Master keys by id; seals with the active one, opens with any of them."""

    __slots__ = ("_active", "_keks", "_macs")

    def __init__(self, keys: Mapping[str, bytes], active_kid: str) -> None:
        if not keys:
            raise ValueError("key ring needs at least one master key")
        for kid, key in keys.items():
            if not _KID.fullmatch(kid):
                raise ValueError(f"crypto key id {kid!r} must match [A-Za-z0-9_-]{{1,64}}")
            if len(key) != KEY_BYTES:
                raise ValueError(f"crypto master key {kid!r} must be {KEY_BYTES} bytes")
        if active_kid not in keys:
            raise ValueError(f"active crypto key id {active_kid!r} names no key in the ring")
        self._keks = {kid: AESGCM(bytes(key)) for kid, key in keys.items()}
        # Keys of their own for authenticating messages between instances (HKDF, so a MAC
        # key reveals nothing of the master key that seals data keys).
        self._macs = {
            kid: _derive(bytes(key), b"relayport message authentication v1")
            for kid, key in keys.items()
        }
        self._active = active_kid

    def __repr__(self) -> str:
        return f"KeyRing(kids={sorted(self._keks)}, active={self._active!r})"

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keks)

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> str:
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        data = nonce + AESGCM(dek).encrypt(nonce, plaintext, _VERSION.encode() + b"." + aad)
        return f"{_VERSION}.{self._active}.{self._wrap(self._active, dek)}.{_b64e(data)}"

    def decrypt(self, token: str, aad: bytes = b"") -> bytes:
        kid, wrapped, data = self._parse(token)
        dek = self._unwrap(kid, wrapped)
        raw = _b64d(data)
        if len(raw) < _NONCE + _TAG:
            raise DecryptionError("malformed token")
        try:
            return AESGCM(dek).decrypt(raw[:_NONCE], raw[_NONCE:], _VERSION.encode() + b"." + aad)
        except (InvalidTag, ValueError):
            raise DecryptionError("token was tampered with or aad does not match") from None

    def encrypt_str(self, plaintext: str, aad: bytes = b"") -> str:
        return self.encrypt(plaintext.encode("utf-8"), aad)

    def decrypt_str(self, token: str, aad: bytes = b"") -> str:
        try:
            return self.decrypt(token, aad).decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError("plaintext is not UTF-8") from None

    def sign(self, message: bytes) -> bytes:
        """`<kid>:<b64url HMAC-SHA256>` of `message` under the active key, for messages that
        instances send each other through a shared service (Redis pub/sub): a party that can
        publish there but holds no master key cannot make one `verify` accepts."""
        tag = hmac.new(self._macs[self._active], message, hashlib.sha256).digest()
        return f"{self._active}:{_b64e(tag)}".encode()

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` (from `sign`, under any key in the ring) is `message`'s."""
        kid, colon, tag = signature.partition(b":")
        key = self._macs.get(kid.decode("ascii", "replace")) if colon else None
        if key is None:
            return False
        expected = _b64e(hmac.new(key, message, hashlib.sha256).digest()).encode()
        return hmac.compare_digest(expected, tag)

    def needs_rewrap(self, token: str) -> bool:
        return self._parse(token)[0] != self._active

    def rewrap(self, token: str) -> str:
        """The same record with its DEK sealed by the active key; the data part is kept verbatim.

        Needs no aad, so it checks the wrapped DEK but not the data part (`decrypt` still does).
        A token already under the active key comes back unchanged, so reruns are cheap.
        """
        kid, wrapped, data = self._parse(token)
        dek = self._unwrap(kid, wrapped)
        if kid == self._active:
            return token
        return f"{_VERSION}.{self._active}.{self._wrap(self._active, dek)}.{data}"

    def _parse(self, token: str) -> tuple[str, str, str]:
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _VERSION:
            raise DecryptionError("malformed token")
        _, kid, wrapped, data = parts
        if kid not in self._keks:
            # The kid is public (it is in the token): naming it helps operators and leaks nothing.
            raise DecryptionError(f"unknown key id {kid[:64]!r}")
        return kid, wrapped, data

    def _wrap(self, kid: str, dek: bytes) -> str:
        nonce = os.urandom(_NONCE)
        return _b64e(nonce + self._keks[kid].encrypt(nonce, dek, f"{_VERSION}.{kid}".encode()))

    def _unwrap(self, kid: str, wrapped: str) -> bytes:
        raw = _b64d(wrapped)
        if len(raw) != _WRAP_BYTES:
            raise DecryptionError("malformed token")
        try:
            return self._keks[kid].decrypt(raw[:_NONCE], raw[_NONCE:], f"{_VERSION}.{kid}".encode())
        except (InvalidTag, ValueError):
            raise DecryptionError("token was tampered with") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The configured keys; outside production with none configured, a key file in data_dir.

        Blocking file I/O: call once at start-up, not per request.
        """
        crypto = settings.crypto
        if crypto.master_keys:
            keys = {
                kid: _decode_master_key(kid, secret.get_secret_value())
                for kid, secret in crypto.master_keys.items()
            }
            return cls(keys, crypto.active_key_id or next(reversed(keys)))
        if settings.env == "production":
            raise ValueError("production needs RELAYPORT_CRYPTO__MASTER_KEYS")
        return cls._from_key_file(Path(settings.data_dir) / KEY_FILE)

    @classmethod
    def _from_key_file(cls, path: Path) -> KeyRing:
        if not path.exists() and _create_key_file(path):
            log.warning(
                "generated a master key for encryption at rest; back it up, or set "
                "RELAYPORT_CRYPTO__MASTER_KEYS: losing it loses every stored secret",
                extra={"event": "crypto.master_key_generated", "path": str(path)},
            )
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            active, stored = doc["active"], doc["keys"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: not a Relayport master key file") from None
        if not isinstance(active, str) or not isinstance(stored, dict):
            raise ValueError(f"{path}: not a Relayport master key file")
        try:
            keys = {str(kid): _decode_master_key(str(kid), str(v)) for kid, v in stored.items()}
            return cls(keys, active)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _create_key_file(path: Path) -> bool:
    """Write a new key file; False when another process got there first (its key wins).

    The file is written under a private temporary name and hard-linked into place, so no reader
    ever sees it half-written and two starting processes cannot end up with different keys.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    kid = f"local-{secrets.token_hex(3)}"
    body = json.dumps({"active": kid, "keys": {kid: generate_master_key()}}).encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL with 0600 at creation: the key is never readable by others, not even for an instant.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True
