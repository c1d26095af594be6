"""Normalization of a verified webhook: its dedup key, its type, its CloudEvents 1.0 envelope.

Pure: the ingestion endpoint calls these after `signatures.verify` and stores what they return.
Everything here reads attacker-shaped JSON, so every lookup tolerates any shape and falls back
instead of raising (only a malformed *configuration*, such as a bad JSON pointer, raises).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from relayport.ingest.signatures import Verified

SPECVERSION = "1.0"
FALLBACK_TYPE = "webhook"
MAX_TYPE_CHARS = 200
# Ids taken from a body become unique keys: same shape as the header ids `verify` accepts.
_ID = re.compile(r"[\x21-\x7e]{1,256}")
# Types become metrics labels and filter values: no control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_POINTER_ESCAPE = re.compile(r"~(?![01])")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")


def parse_json(body: bytes) -> Any:
    """Parse a JSON body strictly (RFC 8259: UTF-8, no NaN, nesting bounded); ValueError if not.

    orjson rather than `json`: `json.loads` accepts NaN/Infinity and raises RecursionError, not
    ValueError, on deep nesting. Integers beyond 64 bits come back as floats.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None


def body_hash(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def dedup_key(
    scheme: str, verified: Verified, headers: Mapping[str, str], body: bytes, payload: Any | None
) -> str:
    """The key that makes a retried delivery a duplicate (unique per source).

    The provider's delivery id when it has one (github ``X-GitHub-Delivery``, standard
    ``webhook-id``: both carried by `verified`), Stripe's event ``id`` (Stripe retries an event
    with a new signature and timestamp but the same id), else a hash of the raw body, which is
    identical across a provider's retries. ``headers`` is part of the signature so that a scheme
    whose id lives only in a header can be added without changing callers.
    """
    if scheme in ("github", "standard") and verified.delivery_id:
        return verified.delivery_id
    if scheme == "stripe" and isinstance(payload, dict):
        event_id = payload.get("id")
        if isinstance(event_id, str) and _ID.fullmatch(event_id):
            return event_id
    return body_hash(body)


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The value at an RFC 6901 JSON pointer; KeyError if absent, ValueError if malformed.

    A few lines instead of the `jsonpointer` package: it is not a dependency, and only reading
    is needed.
    """
    if pointer == "":
        return document
    if not pointer.startswith("/") or _POINTER_ESCAPE.search(pointer):
        raise ValueError(f"not an RFC 6901 JSON pointer: {pointer!r}")
    node = document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")  # this order, per RFC 6901 §4
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and _ARRAY_INDEX.fullmatch(token) and int(token) < len(node):
            node = node[int(token)]
        else:
            raise KeyError(pointer)
    return node


def validate_pointer(pointer: str) -> None:
    """ValueError unless `pointer` is an RFC 6901 JSON pointer (check a source's config on save)."""
    with contextlib.suppress(KeyError):  # absent from `None` is fine: only syntax is checked
        resolve_pointer(None, pointer)


def _clean(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    value = value[:MAX_TYPE_CHARS]
    return None if _CONTROL.search(value) else value


def _get(payload: Any, key: str) -> str | None:
    return _clean(payload.get(key)) if isinstance(payload, dict) else None


def event_type(
    scheme: str, headers: Mapping[str, str], payload: Any, *, type_pointer: str | None = None
) -> str:
    """The CloudEvents ``type``: from the header or body field each provider documents.

    github: ``X-GitHub-Event`` + ``.`` + the body's ``action`` when present (``issues.opened``,
    ``push``); stripe and standard: the body's ``type``; shopify: ``X-Shopify-Topic``; slack: the
    body's ``type``, refined with the inner event's type for ``event_callback``; hmac: the string
    at the JSON pointer ``type_pointer``. Cut to 200 characters; absent, empty or non-string
    values fall back to ``"webhook"``.
    """
    found: str | None = None
    if scheme == "github":
        found = _clean(headers.get("x-github-event"))
        action = _get(payload, "action")
        if found and action:
            found = _clean(f"{found}.{action}")
    elif scheme in ("stripe", "standard"):
        found = _get(payload, "type")
    elif scheme == "shopify":
        found = _clean(headers.get("x-shopify-topic"))
    elif scheme == "slack":
        found = _get(payload, "type")
        inner = _get(payload.get("event"), "type") if isinstance(payload, dict) else None
        if found == "event_callback" and inner:
            found = _clean(f"{found}.{inner}")
    elif scheme == "hmac" and type_pointer is not None:
        try:
            found = _clean(resolve_pointer(payload, type_pointer))
        except KeyError:
            found = None
    return found or FALLBACK_TYPE


def to_cloudevent(
    *,
    event_id: str,
    source: str,
    type: str,  # shadows the builtin: it is the CloudEvents attribute's name
    time: datetime,
    subject: str | None,
    data: Any,
    datacontenttype: str = "application/json",
) -> dict[str, Any]:
    """A CloudEvents 1.0 envelope in its JSON format (absent optional attributes omitted).

    ``bytes`` data (a form-encoded Slack command, say) goes in ``data_base64``, as the JSON
    format requires for binary data.
    """
    for name, value in (("id", event_id), ("source", source), ("type", type)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"CloudEvents {name} must be a non-empty string")
    if time.tzinfo is None:  # RFC 3339 needs an offset; a naive time would be a silent guess
        raise ValueError("time must be timezone-aware")
    event: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": source,
        "type": type,
        "time": time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": datacontenttype,
    }
    if subject is not None:
        event["subject"] = subject
    if isinstance(data, bytes | bytearray | memoryview):
        event["data_base64"] = base64.b64encode(bytes(data)).decode()
    else:
        event["data"] = data
    return event
