"""The HTTP side of sending: one long-lived guarded aiohttp session per worker process (pooled,
keep-alive per host, no redirects, SSRF guard at connect time), and one POST per URL tried."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import aiohttp

from relayport.core.http import AddressPolicy, classify_error, create_http_session
from relayport.core.platform import Platform
from relayport.delivery import routing
from relayport.delivery.breaker import FailureWindow
from relayport.delivery.metrics import ATTEMPT_DURATION
from relayport.settings import DeliverySettings

SNIPPET_BYTES = 8192
MAX_ERROR_CHARS = 500
_EXTRAS_KEY = "delivery.transport"


@dataclass(slots=True)
class PostResult:
    url: str
    status: int | None
    latency_s: float
    snippet: str | None
    error_class: str | None
    error: str | None
    retry_after: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def try_next_url(self) -> bool:
        """Worth trying a fallback URL: the receiver never answered, or answered 5xx."""
        return self.status is None or self.status >= 500


class Transport:
    """Per-process sending state: the HTTP session, the concurrency bound, and each
    endpoint's failure window and per-URL bandit statistics."""

    def __init__(self, settings: DeliverySettings) -> None:
        self.settings = settings
        self.policy = AddressPolicy(settings.allow_cidrs)
        self.slots = asyncio.Semaphore(settings.concurrency)
        self.windows: dict[str, FailureWindow] = {}
        self.arms: dict[str, dict[str, routing.ArmStats]] = {}
        self.turns: dict[str, int] = {}
        self.rng = random.Random()
        # (endpoint id, updated_at) -> (valid until, HMAC keys, Ed25519 seeds)
        self.keys: dict[tuple[str, dt.datetime], tuple[dt.datetime, list[bytes], list[bytes]]] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = create_http_session(
                policy=self.policy,
                connect_timeout_s=self.settings.connect_timeout_s,
                total_timeout_s=self.settings.total_timeout_s,
                limit=self.settings.pool_limit,
                limit_per_host=self.settings.pool_limit_per_host,
                user_agent=self.settings.user_agent,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def window(self, endpoint_id: str) -> FailureWindow:
        window = self.windows.get(endpoint_id)
        if window is None:
            window = self.windows[endpoint_id] = FailureWindow(
                window_s=self.settings.breaker_window_s,
                min_requests=self.settings.breaker_min_requests,
                failure_ratio=self.settings.breaker_failure_ratio,
            )
        return window

    def urls(self, endpoint_id: str, urls: list[str], policy: str) -> list[str]:
        # Round robin turns per endpoint across sends (not per delivery's attempt number, which
        # would send every first attempt to the same URL).
        turn = self.turns.get(endpoint_id, 0)
        self.turns[endpoint_id] = turn + 1
        return routing.order(
            urls, policy, counter=turn, stats=self.arms.get(endpoint_id), rng=self.rng
        )

    def learn(self, endpoint_id: str, result: PostResult) -> None:
        arms = self.arms.setdefault(endpoint_id, {})
        arms.setdefault(result.url, routing.ArmStats()).record(result.ok, result.latency_s)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> PostResult:
        started = perf_counter()
        async with self.slots:
            try:
                async with self.session.post(url, data=body, headers=headers) as response:
                    snippet = await _read_prefix(response, SNIPPET_BYTES)
                    result = PostResult(
                        url=url,
                        status=response.status,
                        latency_s=perf_counter() - started,
                        snippet=snippet.decode("utf-8", "replace"),
                        error_class=None if response.status < 300 else "http",
                        error=None,
                        retry_after=response.headers.get("Retry-After"),
                    )
            except Exception as exc:  # every transport failure is an attempt outcome
                result = PostResult(
                    url=url,
                    status=None,
                    latency_s=perf_counter() - started,
                    snippet=None,
                    error_class=classify_error(exc),
                    error=(f"{type(exc).__name__}: {exc}")[:MAX_ERROR_CHARS],
                    retry_after=None,
                )
        ATTEMPT_DURATION.observe(result.latency_s)
        return result


async def _read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to `limit` bytes of the body; the rest is never read (nor kept in memory)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def transport_of(platform: Platform) -> Transport:
    found: Any = platform.extras.get(_EXTRAS_KEY)
    if found is None:
        found = platform.extras[_EXTRAS_KEY] = Transport(platform.settings.delivery)
    assert isinstance(found, Transport)
    return found


async def close_transport(platform: Platform) -> None:
    found = platform.extras.pop(_EXTRAS_KEY, None)
    if isinstance(found, Transport):
        await found.close()


def epoch(at: dt.datetime) -> float:
    return at.timestamp()
