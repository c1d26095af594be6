"""Provider webhook signatures, verified on the raw body bytes exactly as each provider documents.

github (``x-hub-signature-256``), stripe (``stripe-signature``), standard (Standard Webhooks, and
Svix's ``svix-*`` names), shopify (``x-shopify-hmac-sha256``), slack (``x-slack-signature``) and a
generic ``hmac`` scheme (`HmacConfig`); each parser follows the provider's documentation (quoted
in shared/REFERENCES.md, "Inbound webhooks"). A request passes if any configured secret (several
during rotation) matches any signature in the header, compared with `hmac.compare_digest` on the
decoded bytes. Every refusal is a `SignatureError` with a stable ``reason`` (a metrics label and
the rejection log's key); messages never carry a secret or an expected signature. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from secrets import token_bytes, token_hex, token_urlsafe
from typing import Literal

SCHEMES = ("github", "stripe", "standard", "shopify", "slack", "hmac")

Reason = Literal[
    "missing-signature",
    "malformed-signature",
    "bad-signature",
    "missing-timestamp",
    "stale-timestamp",
    "bad-secret",
]

# Bounds on attacker-controlled input, enforced before any HMAC work: no provider sends a
# signature header this long or more signatures than a rotation needs.
MAX_HEADER_CHARS = 8192
MAX_SIGNATURES = 16
# `[0-9]`, not `\d` or int(): int() also takes "١٢٣", " 12", "1_000", which no provider sends.
_DIGITS = re.compile(r"[0-9]{1,15}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Delivery ids become dedup keys and are signed (standard): visible ASCII only, bounded.
_ID = re.compile(r"[\x21-\x7e]{1,256}")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]{1,100}")
_PREFIX = re.compile(r"[\x20-\x7e]{0,32}")
_WHSEC = "whsec_"


class SignatureError(Exception):
    """A request that must be refused (401). ``reason`` is one of `Reason`."""

    def __init__(self, reason: Reason, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason: Reason = reason


@dataclass(frozen=True)
class HmacConfig:
    """The generic scheme: which header, algorithm, encoding, prefix and optional timestamp."""

    header: str = "x-signature"
    algorithm: str = "sha256"  # "sha256" | "sha512"
    encoding: str = "hex"  # "hex" | "base64"
    prefix: str = ""  # e.g. "sha256="
    timestamp_header: str | None = None  # when set, the signed content is "<ts>.<body>"

    def __post_init__(self) -> None:
        # Users type "X-Signature"; headers reach verify() lower-cased, so normalize once here.
        for name in ("header", "timestamp_header"):
            value = getattr(self, name)
            if value is None and name == "timestamp_header":
                continue
            if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value.lower()):
                raise ValueError(f"{name} must be an HTTP header name")
            object.__setattr__(self, name, value.lower())
        if self.timestamp_header == self.header:
            raise ValueError("timestamp_header must differ from header")
        if self.algorithm not in ("sha256", "sha512"):
            raise ValueError("algorithm must be 'sha256' or 'sha512'")
        if self.encoding not in ("hex", "base64"):
            raise ValueError("encoding must be 'hex' or 'base64'")
        if not isinstance(self.prefix, str) or not _PREFIX.fullmatch(self.prefix):
            raise ValueError("prefix must be at most 32 printable ASCII characters")


@dataclass(frozen=True)
class Verified:
    """What a verified request tells: the provider's delivery id and the signed timestamp."""

    delivery_id: str | None = None
    timestamp: int | None = None


@dataclass(frozen=True)
class _Parsed:
    signed: bytes  # the exact bytes the provider MACs
    candidates: list[bytes]  # decoded signatures found in the header
    verified: Verified = field(default_factory=Verified)
    algorithm: str = "sha256"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if not isinstance(value, str):
        return None
    if len(value) > MAX_HEADER_CHARS:
        raise SignatureError("malformed-signature", f"{name} header is too long")
    return value.strip() or None


def _required(headers: Mapping[str, str], name: str) -> str:
    value = _header(headers, name)
    if value is None:
        raise SignatureError("missing-signature", f"missing {name} header")
    return value


def _fresh(raw: str | None, name: str, now: float, tolerance: int) -> str:
    """The timestamp as sent (it is signed as a string), once checked fresh."""
    if not raw:
        raise SignatureError("missing-timestamp", f"missing {name}")
    if not _DIGITS.fullmatch(raw):
        raise SignatureError("malformed-signature", f"{name} is not unix seconds")
    # Both directions: a timestamp from the future is as replayable as an old one.
    if abs(now - int(raw)) > tolerance:
        raise SignatureError("stale-timestamp", f"{name} is outside the tolerance")
    return raw


def _hex(value: str) -> bytes | None:
    return bytes.fromhex(value) if _HEX.fullmatch(value) else None


def _b64(value: str) -> bytes | None:
    """Standard base64, padding optional (Svix's libraries accept unpadded secrets)."""
    if not _B64.fullmatch(value):
        return None
    value = value.rstrip("=")
    if len(value) % 4 == 1:
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _bounded(found: list[bytes | None], what: str) -> list[bytes]:
    candidates = [c for c in found if c is not None]  # undecodable entries cannot match: skip
    if not candidates:
        raise SignatureError("malformed-signature", f"{what} holds no usable signature")
    if len(candidates) > MAX_SIGNATURES:
        raise SignatureError("malformed-signature", f"{what} holds too many signatures")
    return candidates


_Parser = Callable[[Mapping[str, str], bytes, float, int, HmacConfig], _Parsed]


def _github(h: Mapping[str, str], body: bytes, now: float, tol: int, c: HmacConfig) -> _Parsed:
    sig = _required(h, "x-hub-signature-256")
    candidates = _bounded([_hex(sig[7:]) if sig.startswith("sha256=") else None], "signature")
    d = h.get("x-github-delivery")  # unsigned: kept only if usable as a dedup key, never fatal
    delivery = d if isinstance(d, str) and _ID.fullmatch(d) else None
    return _Parsed(body, candidates, Verified(delivery))


def _stripe(h: Mapping[str, str], body: bytes, now: float, tol: int, c: HmacConfig) -> _Parsed:
    sig = _required(h, "stripe-signature")
    items = [
        (k.strip(), v.strip()) for k, sep, v in (i.partition("=") for i in sig.split(",")) if sep
    ]
    stamps = {v for k, v in items if k == "t"}
    if len(stamps) > 1:  # which one was signed is ambiguous: refuse rather than guess
        raise SignatureError("malformed-signature", "stripe-signature has several timestamps")
    # v0 (test mode) and unknown schemes are ignored, as Stripe's libraries do.
    candidates = _bounded([_hex(v) for k, v in items if k == "v1"], "stripe-signature")
    ts = _fresh(stamps.pop() if stamps else None, "stripe-signature t", now, tol)
    return _Parsed(ts.encode() + b"." + body, candidates, Verified(None, int(ts)))


def _standard(h: Mapping[str, str], body: bytes, now: float, tol: int, c: HmacConfig) -> _Parsed:
    # The three headers are one set: take webhook-* when sent, else Svix's svix-* names.
    p = "webhook" if _header(h, "webhook-signature") is not None else "svix"
    sig = _required(h, f"{p}-signature")
    msg_id = _header(h, f"{p}-id")
    if msg_id is None or not _ID.fullmatch(msg_id):
        raise SignatureError("malformed-signature", f"missing or malformed {p}-id")
    ts = _fresh(_header(h, f"{p}-timestamp"), f"{p}-timestamp", now, tol)
    entries = [e.partition(",") for e in sig.split(" ")]
    # v1a (Ed25519) and future versions are not ours to check.
    candidates = _bounded([_b64(v) for ver, _, v in entries if ver == "v1"], f"{p}-signature")
    signed = f"{msg_id}.{ts}.".encode() + body
    return _Parsed(signed, candidates, Verified(msg_id, int(ts)))


def _shopify(h: Mapping[str, str], body: bytes, now: float, tol: int, c: HmacConfig) -> _Parsed:
    sig = _required(h, "x-shopify-hmac-sha256")
    return _Parsed(body, _bounded([_b64(sig)], "x-shopify-hmac-sha256"))


def _slack(h: Mapping[str, str], body: bytes, now: float, tol: int, c: HmacConfig) -> _Parsed:
    sig = _required(h, "x-slack-signature")
    candidates = _bounded([_hex(sig[3:]) if sig.startswith("v0=") else None], "x-slack-signature")
    ts = _fresh(_header(h, "x-slack-request-timestamp"), "x-slack-request-timestamp", now, tol)
    return _Parsed(b"v0:" + ts.encode() + b":" + body, candidates, Verified(None, int(ts)))


def _generic(h: Mapping[str, str], body: bytes, now: float, tol: int, c: HmacConfig) -> _Parsed:
    sig = _required(h, c.header)
    if not sig.startswith(c.prefix):
        raise SignatureError("malformed-signature", f"{c.header} lacks its prefix")
    value = sig[len(c.prefix) :]
    candidates = _bounded([_hex(value) if c.encoding == "hex" else _b64(value)], c.header)
    if c.timestamp_header is None:
        return _Parsed(body, candidates, algorithm=c.algorithm)
    ts = _fresh(_header(h, c.timestamp_header), c.timestamp_header, now, tol)
    return _Parsed(ts.encode() + b"." + body, candidates, Verified(None, int(ts)), c.algorithm)


_PARSERS: dict[str, _Parser] = {
    "github": _github,
    "stripe": _stripe,
    "standard": _standard,
    "shopify": _shopify,
    "slack": _slack,
    "hmac": _generic,
}


def _key(scheme: str, secret: str) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise SignatureError("bad-secret", "empty secret")
    if scheme == "standard":
        key = _b64(secret.removeprefix(_WHSEC))
        if not key:
            raise SignatureError("bad-secret", "a standard secret is whsec_ + base64")
        return key
    try:
        return secret.encode()
    except UnicodeEncodeError:  # lone surrogates: no bytes a provider could have used
        raise SignatureError("bad-secret", "secret is not encodable as UTF-8") from None


def validate_secret(scheme: str, secret: str) -> None:
    """Raise SignatureError("bad-secret") for a secret `verify` could not use (check on save)."""
    _scheme(scheme)
    _key(scheme, secret)


def _scheme(scheme: str) -> _Parser:
    try:
        return _PARSERS[scheme]
    except KeyError:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}") from None


def verify(
    scheme: str,
    headers: Mapping[str, str],
    body: bytes,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: int = 300,
    hmac_config: HmacConfig | None = None,
) -> Verified:
    """Check `body` against the signature headers; return what the request tells or raise."""
    parser = _scheme(scheme)
    if isinstance(secrets, str):  # a str is a Sequence[str]: each character would be a secret
        raise TypeError("secrets must be a sequence of secrets, not one string")
    if tolerance_s < 0 or not math.isfinite(now):  # NaN would make every timestamp fresh
        raise ValueError("tolerance_s must be >= 0 and now finite")
    # Header checks and freshness come first: cheap, and they need no secret.
    parsed = parser(headers, body, now, tolerance_s, hmac_config or HmacConfig())
    unusable = not secrets
    for secret in secrets:
        try:
            key = _key(scheme, secret)
        except SignatureError:
            unusable = True  # one broken secret must not lock out requests signed with another
            continue
        expected = hmac.new(key, parsed.signed, parsed.algorithm).digest()
        # Compare with every candidate (no early exit inside) so timing says nothing about which.
        if sum(hmac.compare_digest(expected, c) for c in parsed.candidates):
            return parsed.verified
    if unusable:  # surfaces a misconfigured source instead of blaming the sender
        raise SignatureError("bad-secret", "no configured secret matched and one is unusable")
    raise SignatureError("bad-signature", "no signature matched")


def sign(
    scheme: str,
    body: bytes,
    secret: str,
    *,
    now: float,
    msg_id: str | None = None,
    hmac_config: HmacConfig | None = None,
) -> dict[str, str]:
    """Headers a provider would send for `body` (tests, benchmarks, documentation examples)."""
    _scheme(scheme)
    key = _key(scheme, secret)
    ts = str(int(now))

    def mac(data: bytes, algorithm: str = "sha256") -> bytes:
        return hmac.new(key, data, algorithm).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    if scheme == "github":
        headers = {"x-hub-signature-256": "sha256=" + mac(body).hex()}
        return headers | ({"x-github-delivery": msg_id} if msg_id else {})
    if scheme == "stripe":
        return {"stripe-signature": f"t={ts},v1={mac(ts.encode() + b'.' + body).hex()}"}
    if scheme == "standard":
        mid = msg_id or "msg_" + token_hex(12)
        if not _ID.fullmatch(mid):
            raise ValueError("msg_id must be 1-256 visible ASCII characters")
        sig = b64(mac(f"{mid}.{ts}.".encode() + body))
        return {"webhook-id": mid, "webhook-timestamp": ts, "webhook-signature": f"v1,{sig}"}
    if scheme == "shopify":
        return {"x-shopify-hmac-sha256": b64(mac(body))}
    if scheme == "slack":
        sig = "v0=" + mac(b"v0:" + ts.encode() + b":" + body).hex()
        return {"x-slack-request-timestamp": ts, "x-slack-signature": sig}
    cfg = hmac_config or HmacConfig()
    data = body if cfg.timestamp_header is None else ts.encode() + b"." + body
    digest = mac(data, cfg.algorithm)
    headers = {cfg.header: cfg.prefix + (digest.hex() if cfg.encoding == "hex" else b64(digest))}
    return headers | ({cfg.timestamp_header: ts} if cfg.timestamp_header else {})


def generate_secret(scheme: str) -> str:
    """A fresh secret in the form the scheme's providers use."""
    _scheme(scheme)
    if scheme == "standard":
        return _WHSEC + base64.b64encode(token_bytes(24)).decode()
    return token_urlsafe(32)
