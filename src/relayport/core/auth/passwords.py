"""Argon2id password hashing, run in threads so the event loop never stalls on it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# argon2-cffi's defaults are RFC 9106's low-memory profile (t=3, m=64 MiB, p=4).
_hasher = PasswordHasher()
# Each hash holds 64 MiB; a small dedicated pool bounds memory under a login flood and keeps
# hashing from starving the default executor.
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="argon2")
# Verified against when the email is unknown, so timing does not reveal which emails exist.
_DUMMY_HASH = _hasher.hash("relayport-dummy-password")


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_pool, _hasher.hash, password)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """Constant work whether or not the user exists."""
    target = stored_hash or _DUMMY_HASH
    loop = asyncio.get_running_loop()
    try:
        ok = await loop.run_in_executor(_pool, _hasher.verify, target, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return bool(ok) and stored_hash is not None


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)
