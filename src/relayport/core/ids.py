"""Sortable, typed identifiers: `<prefix>_<26 chars>`, the UUIDv7 of RFC 9562 in Crockford base32.

Written here because the standard library gains `uuid7` only in Python 3.14; the encoding is the
TypeID one, so ids sort by creation time as strings and say what they name.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7_int() -> int:
    """A UUIDv7 as an int; monotonic within a process (a 12-bit counter orders same-ms ids)."""
    global _last_ms, _counter
    with _lock:
        now = time.time_ns() // 1_000_000
        if now <= _last_ms:
            _counter += 1
            if _counter > 0xFFF:  # counter spent: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            now = _last_ms
        else:
            _last_ms = now
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return (now << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b


def encode(value: int) -> str:
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def decode(text: str) -> int:
    if len(text) != 26 or text[0] not in "01234567":
        raise ValueError("not a 26-character id")
    value = 0
    for char in text:
        value = (value << 5) | _DECODE[char]  # KeyError for a foreign character
    return value


def new_id(prefix: str) -> str:
    """A new id such as `ten_01jd…`."""
    return f"{prefix}_{encode(uuid7_int())}"


def is_valid(value: str, prefix: str) -> bool:
    """Cheap shape check so a malformed path id is a 404, not a database round trip."""
    head, sep, tail = value.partition("_")
    if not sep or head != prefix:
        return False
    try:
        decode(tail)
    except (ValueError, KeyError):
        return False
    return True
