"""Pure document logic of live configuration: canonical JSON, the hash chain, secret paths,
schema validation and JSON Patch. No I/O, so it is tested directly and shared with the client.

An environment's state is a *document*: ``{key: value}``. Values under schema paths marked
``"x-secret": true`` or ``"writeOnly": true`` are secrets; the stored (and hashed) form of a
document replaces each secret by ``{"$secret": <commitment>}``, an HMAC-SHA256 of the value's
canonical JSON under a random 32-byte salt kept with the encrypted value. The commitment changes
when the value does, yet cannot be brute-forced from the hash chain without the salt.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jsonpatch
import jsonpointer
from jsonschema import Draft7Validator, Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

SECRET_MARK = "$secret"  # noqa: S105 (a marker key, not a password)
DRAFT7 = {"http://json-schema.org/draft-07/schema#", "http://json-schema.org/draft-07/schema"}
MAX_DEPTH = 64


class PatchFailed(ValueError):
    """A JSON Patch that is malformed or does not apply (a failed `test` included)."""


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def meta_digest(schemas: Mapping[str, Any], author: str, message: str, created_at: str) -> str:
    """Digest of what a version says about itself besides its content.

    Kept apart from the content so a client can check the chain from the document it holds
    and this one digest, without receiving every schema.
    """
    return sha256_hex(
        canonical(
            {
                "author": author,
                "created_at": created_at,
                "message": message,
                "schemas": dict(schemas),
            }
        )
    )


def version_hash(previous: str, revision: int, stored_doc: Mapping[str, Any], meta: str) -> str:
    """SHA-256 of the canonical JSON of one version; `previous` links it to its parent."""
    return sha256_hex(
        canonical({"config": dict(stored_doc), "meta": meta, "previous": previous, "rev": revision})
    )


# --- pointers --------------------------------------------------------------------------------


def escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def pointer(*tokens: str | int) -> str:
    return "".join("/" + escape(str(t)) for t in tokens)


def _resolve(schema: Any, root: Any) -> Any:
    """Follow local `$ref`s (`#/$defs/x`, `#/definitions/x`); others are left as they are."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < MAX_DEPTH:
        ref = schema["$ref"]
        if not ref.startswith("#"):
            return schema
        try:
            target = jsonpointer.resolve_pointer(root, ref[1:])
        except jsonpointer.JsonPointerException:
            return schema
        merged = dict(target) if isinstance(target, dict) else {}
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        schema, seen = merged, seen + 1
    return schema


def _is_secret(schema: Any) -> bool:
    return isinstance(schema, dict) and (
        schema.get("x-secret") is True or schema.get("writeOnly") is True
    )


def secret_pointers(schema: Any, value: Any) -> list[str]:
    """Pointers (relative to `value`) of every value the schema marks secret.

    Follows `properties`, `allOf`,
    `additionalProperties`, `prefixItems`/`items` and local `$ref`s; a secret node covers
    everything below it.
    """
    out: list[str] = []

    def walk(node: Any, val: Any, where: str, depth: int) -> None:
        if depth > MAX_DEPTH or not isinstance(node, dict):
            return
        node = _resolve(node, schema)
        if _is_secret(node):
            out.append(where)
            return
        for part in node.get("allOf", []) if isinstance(node.get("allOf"), list) else []:
            walk(part, val, where, depth + 1)
        if isinstance(val, dict):
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            extra = node.get("additionalProperties")
            for key, sub in val.items():
                child = props.get(key, extra if isinstance(extra, dict) else None)
                walk(child, sub, where + "/" + escape(key), depth + 1)
        elif isinstance(val, list):
            prefix = node.get("prefixItems")
            items = node.get("items")
            for index, sub in enumerate(val):
                if isinstance(prefix, list) and index < len(prefix):
                    child = prefix[index]
                elif isinstance(items, list):  # draft 7 tuple form
                    child = items[index] if index < len(items) else node.get("additionalItems")
                else:
                    child = items
                walk(child, sub, f"{where}/{index}", depth + 1)

    walk(schema, value, "", 0)
    return sorted(set(out))


# --- schemas ---------------------------------------------------------------------------------


def _draft(schema: Any) -> Any:
    """The validator class: draft 7 when the schema says so, else draft 2020-12."""
    declared = schema.get("$schema") if isinstance(schema, dict) else None
    draft7 = isinstance(declared, str) and declared in DRAFT7
    return Draft7Validator if draft7 else Draft202012Validator


def schema_errors(schema: Any) -> list[dict[str, str]]:
    """Why `schema` is not a valid JSON Schema (draft 7 when it says so, else 2020-12)."""
    if not isinstance(schema, dict | bool):
        return [{"pointer": "", "message": "a schema is an object or a boolean"}]
    try:
        _draft(schema).check_schema(schema)
    except SchemaError as exc:
        return [{"pointer": pointer(*exc.absolute_path), "message": exc.message}]
    return []


def violations(schema: Any, value: Any) -> list[dict[str, str]]:
    """Every place `value` breaks `schema`, as JSON pointers into the value, in order.

    A schema that is valid yet cannot be applied (a remote or dangling `$ref`: nothing is ever
    fetched) is reported as one violation at the root rather than an error.
    """
    validator = _draft(schema)(schema, format_checker=FormatChecker())
    try:
        errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.path)))
    except Exception as exc:  # referencing errors and the like: refuse, never crash
        return [{"pointer": "", "message": f"schema cannot be applied: {type(exc).__name__}",
                 "keyword": "$ref"}]  # fmt: skip
    return [
        {"pointer": pointer(*e.absolute_path), "message": e.message, "keyword": str(e.validator)}
        for e in errors
    ]


# --- secrets: split, redact, merge ---------------------------------------------------------


def commitment(salt: bytes, value: Any) -> str:
    return hmac.new(salt, canonical(value), hashlib.sha256).hexdigest()


def _get(doc: Any, ptr: str) -> Any:
    return jsonpointer.resolve_pointer(doc, ptr)


def _set(doc: Any, ptr: str, value: Any) -> Any:
    if ptr == "":
        return value
    return jsonpointer.set_pointer(doc, ptr, value, inplace=True)


def split_secrets(
    doc: Mapping[str, Any],
    pointers: list[str],
    previous: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(stored document with commitments, {pointer: {"v": value, "s": salt hex}}).

    A secret equal to the one at the same pointer in `previous` keeps its salt, so its
    commitment (and hence diffs between versions) stays the same.
    """
    stored = copy.deepcopy(dict(doc))
    secrets: dict[str, dict[str, Any]] = {}
    for ptr in sorted(pointers, key=len, reverse=True):  # deepest first
        value = _get(doc, ptr)
        old = (previous or {}).get(ptr)
        if old is not None and canonical(old["v"]) == canonical(value):
            salt_hex = str(old["s"])
        else:
            salt_hex = os.urandom(32).hex()
        secrets[ptr] = {"v": value, "s": salt_hex}
        stored = _set(stored, ptr, {SECRET_MARK: commitment(bytes.fromhex(salt_hex), value)})
    return stored, secrets


def reveal(stored: Mapping[str, Any], secrets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The full document: each commitment replaced by its secret value."""
    doc = copy.deepcopy(dict(stored))
    for ptr in sorted(secrets, key=len):  # shallowest first
        doc = _set(doc, ptr, copy.deepcopy(secrets[ptr]["v"]))
    return doc


def redact_like(full: Any, commitments: Mapping[str, str]) -> Any:
    """The stored form of a full document, given {pointer: commitment}: what a client holding
    secrets recomputes to check the hash chain."""
    doc = copy.deepcopy(full)
    for ptr in sorted(commitments, key=len, reverse=True):
        doc = _set(doc, ptr, {SECRET_MARK: commitments[ptr]})
    return doc


def commitments_of(stored: Any, where: str = "") -> dict[str, str]:
    """{pointer: commitment} for every secret marker in a stored document."""
    out: dict[str, str] = {}
    for ptr, node in _walk(stored, where):
        if isinstance(node, dict) and set(node) == {SECRET_MARK}:
            out[ptr] = str(node[SECRET_MARK])
    return out


def _walk(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    yield where, node
    if isinstance(node, dict) and set(node) != {SECRET_MARK}:
        for key, sub in node.items():
            yield from _walk(sub, where + "/" + escape(key))
    elif isinstance(node, list):
        for index, sub in enumerate(node):
            yield from _walk(sub, f"{where}/{index}")


# --- JSON Patch ------------------------------------------------------------------------------


def diff(old: Any, new: Any) -> list[dict[str, Any]]:
    """RFC 6902 operations turning `old` into `new`."""
    ops: list[dict[str, Any]] = jsonpatch.make_patch(old, new).patch
    return ops


def apply_patch(doc: Any, ops: Any) -> Any:
    """`doc` with the RFC 6902 `ops` applied (a new object; `doc` is left alone)."""
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise PatchFailed("a JSON Patch is an array of operation objects")
    try:
        return jsonpatch.JsonPatch(ops).apply(doc, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise PatchFailed(str(exc)) from None
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise PatchFailed(f"invalid patch: {exc}") from None
