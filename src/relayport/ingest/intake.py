"""The public ingest path: find the source, spend its limits, read the body within its size,
verify the signature, then store inbox row + job + outbox row.

The store goes through the process's group committer (`inbox`): this request's rows commit in
one transaction with those of concurrent requests, and `accept` returns only after that
commit, so a 202 means the event is durable. A refused signature's rejection row is committed
in its own transaction before the 401. Every outcome is counted in
`webhooks_received_total{source,result}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from relayport.core.db import utcnow
from relayport.core.errors import (
    NotFound,
    PayloadTooLarge,
    Problem,
    RateLimited,
    UnsupportedMediaType,
)
from relayport.core.groupcommit import sqlite_write_lock
from relayport.core.ids import is_valid, new_id
from relayport.core.platform import Platform
from relayport.core.ratelimit import Limit
from relayport.ingest import events, repository, signatures
from relayport.ingest.inbox import NewEvent, inbox_writer
from relayport.ingest.metrics import JOBS_CREATED, UNKNOWN_SOURCE, WEBHOOKS_RECEIVED
from relayport.ingest.models import Rejection
from relayport.ingest.service import needs_json
from relayport.ingest.sources_cache import SourceConfig, source_cache

log = logging.getLogger("relayport.ingest")

REJECTIONS_KEPT = 100
REJECTIONS_MAX_AGE = dt.timedelta(days=7)
REJECTION_BODY_BYTES = 1024
# HMAC of a large body takes milliseconds; past this size it runs off the event loop.
THREAD_VERIFY_BYTES = 256 * 1024
MAX_KEY_CHARS = 300

# Headers kept with an event (and a rejection): what identifies and describes a delivery.
_KEEP = frozenset({"content-type", "user-agent", "x-request-id", "traceparent"})
_KEEP_PREFIXES = ("x-github-", "x-shopify-", "x-slack-", "webhook-", "svix-", "stripe-", "x-hub-")
_SIGNATURE_HEADERS = frozenset(
    {
        "x-hub-signature",
        "x-hub-signature-256",
        "stripe-signature",
        "webhook-signature",
        "svix-signature",
        "x-shopify-hmac-sha256",
        "x-slack-signature",
    }
)
MAX_KEPT_HEADERS = 32
MAX_HEADER_VALUE = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def rejections_cutoff() -> dt.datetime:
    """Rejections older than this are expired (pruned on the next insert, hidden until then)."""
    return utcnow() - REJECTIONS_MAX_AGE


_COUNTERS: dict[tuple[str, str], Any] = {}


def _count(source_id: str, result: str) -> None:
    # `labels()` takes a lock and validates on every call; the children are kept here (bounded
    # like the label set itself: sources that exist, times the few results).
    counter = _COUNTERS.get((source_id, result))
    if counter is None:
        if len(_COUNTERS) >= 100_000:
            _COUNTERS.clear()
        counter = _COUNTERS[(source_id, result)] = WEBHOOKS_RECEIVED.labels(source_id, result)
    counter.inc()


async def find_and_admit(
    platform: Platform, source_id: str, ip_limit: Limit | None
) -> tuple[SourceConfig, dict[str, str]]:
    """The enabled source named in the URL with its limits spent, and the RateLimit headers of
    the tightest; 404 (403 when disabled) or 429.

    `ip_limit` is the client IP's bucket when this request still owes it (see
    `core.limits.owed_ip_limit`). For a source in the process's cache (the steady state) it is
    spent in the same limiter call as the source's own limits; otherwise it is spent alone
    first, so that a flood of unknown ids is throttled before it can reach the database.
    """
    cache = source_cache(platform)
    config = cache.cached(source_id)  # only well-formed ids are ever cached
    valid = config is not None or is_valid(source_id, "src")
    if config is None or not config.enabled:
        if ip_limit is not None:
            await _spend_ip(platform, ip_limit)
            ip_limit = None
        if valid and config is None:
            config = await cache.get(platform, source_id)
    if config is None:
        _count(UNKNOWN_SOURCE, "not_found")
        raise NotFound("no such source")
    if not config.enabled:
        _count(config.id, "disabled")
        raise Problem(
            "this source is disabled", status=403, slug="source-disabled", title="Source disabled"
        )
    return config, await admit(platform, config, ip_limit)


async def _spend_ip(platform: Platform, ip_limit: Limit) -> None:
    (decision,) = await platform.limiter.check([ip_limit])
    if not decision.allowed:
        raise RateLimited("slow down", slug="rate-limited", headers=decision.headers())


async def find_source(platform: Platform, source_id: str) -> SourceConfig:
    """The enabled source named in the URL, or 404 (403 when disabled)."""
    return (await find_and_admit(platform, source_id, None))[0]


def _source_limits(platform: Platform, source: SourceConfig) -> list[Limit]:
    """The source's bucket, the tenant's ingest bucket and its daily quota (made once per
    source config: the same few recur on every request)."""
    memo = source_cache(platform).limits
    known = memo.get(source.id)
    if known is not None and known[0] is source:
        return known[1]
    settings = platform.settings
    plans = settings.ratelimit.plans
    plan = plans.get(source.plan) or plans["free"]
    limits = [
        Limit.bucket(
            f"is:{source.id}",
            rate=settings.ingest.source_requests_per_second,
            burst=settings.ingest.source_burst,
        ),
        # Its own tenant bucket, so a webhook flood cannot lock the tenant out of the API;
        # the daily quota is the tenant's one quota.
        Limit.bucket(f"it:{source.tenant_id}", rate=plan.requests_per_second, burst=plan.burst),
        Limit.daily_quota(f"q:{source.tenant_id}", limit=plan.daily_quota),
    ]
    if len(memo) >= 10_000:
        memo.clear()
    memo[source.id] = (source, limits)
    return limits


async def admit(
    platform: Platform, source: SourceConfig, ip_limit: Limit | None = None
) -> dict[str, str]:
    """Spend the source's bucket, the tenant's ingest bucket and its daily quota (and the
    client IP's bucket when given), all or none, in one limiter call; returns the RateLimit
    headers of the tightest of the source's limits."""
    if not platform.settings.ratelimit.enabled:
        return {}
    limits = _source_limits(platform, source)
    if ip_limit is not None:
        limits = [ip_limit, *limits]
    decisions = await platform.limiter.check(limits)
    if ip_limit is not None:
        ip_decision, *decisions = decisions
        if not ip_decision.allowed:
            raise RateLimited("slow down", slug="rate-limited", headers=ip_decision.headers())
    for index, decision in enumerate(decisions):
        if not decision.allowed:
            _count(source.id, "rate_limited")
            quota = index == 2
            raise RateLimited(
                "daily quota exhausted" if quota else "slow down",
                slug="quota-exceeded" if quota else "rate-limited",
                headers=decision.headers(),
            )
    return min(decisions, key=lambda d: d.remaining).headers()


def _too_large(source: SourceConfig) -> PayloadTooLarge:
    _count(source.id, "too_large")
    # The rest of the body is still on the wire: close rather than read it.
    return PayloadTooLarge(
        f"the request body exceeds this source's {source.body_limit_bytes} bytes",
        headers={"Connection": "close"},
    )


async def read_body(
    source: SourceConfig, chunks: AsyncIterator[bytes], declared_length: int | None
) -> bytes:
    """The body, refused as soon as it passes the source's limit (the declared length first)."""
    limit = source.body_limit_bytes
    if declared_length is not None and declared_length > limit:
        raise _too_large(source)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(source)
        parts.append(chunk)
    return b"".join(parts)


def kept_headers(
    headers: Mapping[str, str], source: SourceConfig, *, with_signatures: bool = False
) -> dict[str, str]:
    own = {source.hmac.timestamp_header} if source.hmac and source.hmac.timestamp_header else set()
    signature_names = _SIGNATURE_HEADERS | ({source.hmac.header} if source.hmac else set())
    out: dict[str, str] = {}
    for name, value in headers.items():
        if len(out) >= MAX_KEPT_HEADERS:
            break
        if name in signature_names:
            if not with_signatures:
                continue
        elif name not in _KEEP and name not in own and not name.startswith(_KEEP_PREFIXES):
            continue
        out[name] = _CONTROL.sub("", value)[:MAX_HEADER_VALUE]
    return out


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Literal["accepted", "duplicate", "challenge"]
    event_id: str  # for "challenge": the challenge to echo

    @property
    def status_code(self) -> int:
        return 202 if self.status == "accepted" else 200

    def body(self) -> dict[str, str]:
        if self.status == "challenge":
            return {"challenge": self.event_id}
        return {"status": self.status, "event_id": self.event_id}


async def accept(
    platform: Platform,
    source: SourceConfig,
    headers: Mapping[str, str],
    body: bytes,
) -> Outcome:
    """Verify, normalize and store one delivery. `headers` have lower-case names."""
    now = utcnow()
    verified = await _verify(platform, source, headers, body, now)
    try:
        payload: Any = events.parse_json(body)
    except ValueError:
        if needs_json(source.scheme, source.type_pointer):
            _count(source.id, "unsupported_media_type")
            raise UnsupportedMediaType(
                f"a {source.scheme} source takes a JSON body", slug="unsupported-media-type"
            ) from None
        payload = None
    challenge = _slack_challenge(source.scheme, payload)
    if challenge is not None:
        # Slack's URL verification: a signed handshake when the Events API URL is set up, to be
        # answered with its challenge; not an event, so nothing is stored.
        _count(source.id, "challenge")
        return Outcome("challenge", challenge)
    key = events.dedup_key(source.scheme, verified, headers, body, payload)
    if len(key) > MAX_KEY_CHARS:
        key = events.body_hash(key.encode())
    row = {
        "id": new_id("evt"),
        "tenant_id": source.tenant_id,
        "source_id": source.id,
        "dedup_key": key,
        "type": events.event_type(
            source.scheme, headers, payload, type_pointer=source.type_pointer
        ),
        "subject": _subject(source.scheme, headers, payload),
        "body": body,
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "headers": kept_headers(headers, source),
        "received_at": now,
        "duplicate_count": 0,
    }
    try:
        stored = await inbox_writer(platform).submit(NewEvent(row, source.max_attempts))
    except Problem:
        raise
    except Exception as exc:
        # Not stored (or not known to be): never a 202. The provider retries, and if the row
        # did commit after all, its retry is acknowledged as a duplicate.
        _count(source.id, "unavailable")
        log.error(
            "delivery not stored",
            extra={"event": "ingest.store_failed", "source_id": source.id,
                   "error": f"{type(exc).__name__}: {exc}"[:300]},
        )  # fmt: skip
        raise Problem(
            "the delivery could not be stored; send it again",
            status=503,
            slug="ingest-unavailable",
            title="Delivery not stored",
            headers={"Retry-After": "1"},
        ) from exc
    if stored.status == "accepted":
        JOBS_CREATED.inc()
    _count(source.id, stored.status)
    return Outcome(stored.status, stored.event_id)


async def _verify(
    platform: Platform,
    source: SourceConfig,
    headers: Mapping[str, str],
    body: bytes,
    now: dt.datetime,
) -> signatures.Verified:
    secrets = source.active_secrets(now)
    args = (source.scheme, headers, body, secrets)
    kwargs: dict[str, Any] = {
        "now": now.timestamp(),
        "tolerance_s": source.tolerance_s,
        "hmac_config": source.hmac,
    }
    try:
        if len(body) > THREAD_VERIFY_BYTES:
            return await asyncio.to_thread(signatures.verify, *args, **kwargs)
        return signatures.verify(*args, **kwargs)
    except signatures.SignatureError as exc:
        reason = exc.reason
    _count(source.id, "invalid_signature")
    # Its own transaction, committed before the 401 goes out: the row is the point of it.
    async with (
        sqlite_write_lock(platform) or contextlib.nullcontext(),
        platform.db.transaction() as session,
    ):
        session.add(
            Rejection(
                id=new_id("rej"),
                tenant_id=source.tenant_id,
                source_id=source.id,
                reason=reason,
                received_at=now,
                headers=kept_headers(headers, source, with_signatures=True),
                body_prefix=body[:REJECTION_BODY_BYTES],
                body_size=len(body),
            )
        )
        await session.flush()
        await repository.prune_rejections(
            session, source.id, keep=REJECTIONS_KEPT, older_than=now - REJECTIONS_MAX_AGE
        )
    log.info(
        "webhook rejected",
        extra={"event": "ingest.rejected", "source_id": source.id, "reason": reason},
    )
    raise Problem(
        f"signature verification failed: {reason}",
        status=401,
        slug="invalid-signature",
        title="Invalid signature",
        reason=reason,
    )


MAX_CHALLENGE_CHARS = 200


def _slack_challenge(scheme: str, payload: Any) -> str | None:
    """The challenge of a Slack `url_verification` request, None for anything else."""
    if scheme != "slack" or not isinstance(payload, dict):
        return None
    if payload.get("type") != "url_verification":
        return None
    challenge = payload.get("challenge")
    if not isinstance(challenge, str) or not 0 < len(challenge) <= MAX_CHALLENGE_CHARS:
        return None
    return None if _CONTROL.search(challenge) else challenge


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not value or _CONTROL.search(value):
        return None
    return value[:200]


def _subject(scheme: str, headers: Mapping[str, str], payload: Any) -> str | None:
    """The CloudEvents `subject`: what the event is about, where the provider says so."""
    body = payload if isinstance(payload, dict) else {}
    if scheme == "github":
        repo = body.get("repository")
        return _text(repo.get("full_name")) if isinstance(repo, dict) else None
    if scheme == "stripe":
        data = body.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        return _text(obj.get("id")) if isinstance(obj, dict) else None
    if scheme == "shopify":
        return _text(headers.get("x-shopify-shop-domain"))
    if scheme == "slack":
        return _text(body.get("team_id"))
    return None
