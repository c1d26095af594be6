"""The one outbound HTTP client of the platform: aiohttp behind an SSRF guard.

Webhook delivery and the LLM gateway reach URLs that tenants type in, so every connection
is checked against `AddressPolicy` at the one place that knows the final address: the
connector's host resolution. `GuardedConnector._resolve_host` checks every address aiohttp
is about to dial, whether it came from DNS (through `GuardedResolver`), from the DNS cache
or from an IP literal (aiohttp skips the resolver for literals), so the address checked is
the address dialled and there is no DNS-rebinding window. Redirects are never followed and
proxies are refused, because both would move the dialled address away from the checked one.

Call `create_http_session` inside a running event loop (aiohttp requires it) and close the
session on shutdown.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any, Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.resolver import DefaultResolver
from aiohttp.tracing import Trace
from yarl import URL

from relayport.core.netguard import IPAddress, is_forbidden_address, parse_host_ip

__all__ = [
    "AddressPolicy",
    "ForbiddenAddress",
    "ForbiddenURL",
    "GuardedConnector",
    "GuardedResolver",
    "HostNotResolved",
    "OutboundError",
    "classify_error",
    "create_http_session",
    "is_forbidden_address",
]

# The guard overrides two private aiohttp methods (see GuardedConnector, GuardedSession).
# aiohttp is pinned, but fail at import rather than run unguarded if an upgrade renames them.
for _owner, _name in ((aiohttp.TCPConnector, "_resolve_host"), (aiohttp.ClientSession, "_request")):
    if not callable(getattr(_owner, _name, None)):  # pragma: no cover - upgrade tripwire
        raise ImportError(f"aiohttp {aiohttp.__version__}: {_owner.__name__}.{_name} is gone")

_SCHEMES: Final = frozenset({"http", "https"})
_PASSED_MAX: Final = 10_000  # URLs remembered as passing `AddressPolicy.check_url`


class OutboundError(Exception):
    """Base of the errors this module raises itself (aiohttp's own errors pass through)."""


class ForbiddenAddress(OutboundError):
    """The target is, or resolves to, an address the policy forbids."""

    def __init__(self, reason: str, ip: IPAddress | str) -> None:
        super().__init__(f"outbound request to {ip} refused: {reason}")
        self.reason = reason
        self.ip = ip


class ForbiddenURL(OutboundError):
    """The URL itself is refused (scheme, credentials, missing host, plain http, proxy)."""

    def __init__(self, reason: str, url: str) -> None:
        super().__init__(f"outbound URL refused: {reason}")
        self.reason = reason
        # The URL may carry credentials or tokens: keep it for callers, never in the message.
        self.url = url


class HostNotResolved(OutboundError):
    """Creation-time validation could not resolve the host at all."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host!r} does not resolve")
        self.host = host


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    ip: IPAddress | None  # set when the host is an IP literal


class AddressPolicy:
    """The deny list of `netguard` plus an operator allow-list that overrides it.

    Plain http is accepted, when https is required, only for targets proven to be inside
    the allow-list: an IP literal in it (`check_url`), or a name whose every address is in
    it (`check_url_resolved`). That keeps `http://127.0.0.1:9000` usable for test receivers
    and local model servers without letting any public target go out unencrypted.
    """

    def __init__(self, allow_cidrs: Sequence[str] = ()) -> None:
        # strict=True: "10.0.0.1/8" is a typo for a host or a network; refuse to guess.
        self._allowed: tuple[IPv4Network | IPv6Network, ...] = tuple(
            ip_network(cidr, strict=True) for cidr in allow_cidrs
        )
        # URL strings `check_url` passed: without DNS its verdict depends on the string and
        # this (immutable) policy only, and parsing it cost ~10 us on every delivery attempt.
        self._passed: set[tuple[str, bool]] = set()

    def is_allowed(self, ip: IPAddress) -> bool:
        """True if the operator allow-list covers `ip` (or the IPv4 address it maps)."""
        # The kernel dials ::ffff:a.b.c.d as the IPv4 address, so the IPv4 allow-list covers it.
        mapped = ip.ipv4_mapped if isinstance(ip, IPv6Address) else None
        return any(ip in net or (mapped is not None and mapped in net) for net in self._allowed)

    def check(self, ip: IPAddress) -> None:
        if self.is_allowed(ip):
            return
        reason = is_forbidden_address(ip)
        if reason is not None:
            raise ForbiddenAddress(reason, ip)

    def check_host(self, host: str) -> IPAddress:
        """Check an address string as a resolver returns it; unparseable fails closed."""
        try:
            ip = parse_host_ip(host)
        except ValueError:
            ip = None
        if ip is None:
            raise ForbiddenAddress("unparseable", host)
        self.check(ip)
        return ip

    def check_url(self, url: str | URL, *, require_https: bool = True) -> None:
        """Check what can be checked without DNS; hostnames are checked when the connector
        resolves them (or by `check_url_resolved`)."""
        key = (url, require_https) if isinstance(url, str) else None
        if key is not None and key in self._passed:
            return
        target = self._parse(url)
        if target.ip is not None:
            self.check(target.ip)
        self._check_scheme(target, [] if target.ip is None else [target.ip], require_https, url)
        if key is not None:
            if len(self._passed) >= _PASSED_MAX:
                self._passed.clear()
            self._passed.add(key)

    async def check_url_resolved(
        self,
        url: str | URL,
        *,
        require_https: bool = True,
        resolver: AbstractResolver | None = None,
    ) -> None:
        """`check_url` plus DNS: every address the host resolves to must be allowed.

        For validating a URL when it is saved; the connection is checked again when made,
        since DNS answers change. `resolver` defaults to the one the sessions use.
        """
        target = self._parse(url)
        if target.ip is not None:
            addresses: list[IPAddress] = [target.ip]
            self.check(target.ip)
        else:
            guarded = GuardedResolver(self, resolver)
            try:
                results = await guarded.resolve(target.host, target.port, socket.AF_UNSPEC)
            except OSError as exc:
                raise HostNotResolved(target.host) from exc
            finally:
                await guarded.close()
            addresses = [self.check_host(r["host"]) for r in results]
        self._check_scheme(target, addresses, require_https, url)

    def _check_scheme(
        self, target: _Target, addresses: list[IPAddress], require_https: bool, url: str | URL
    ) -> None:
        # Plain http only when every address is proven to be inside the allow-list; an
        # unresolved name proves nothing.
        internal = bool(addresses) and all(self.is_allowed(ip) for ip in addresses)
        if target.scheme == "http" and require_https and not internal:
            raise ForbiddenURL("https-required", str(url))

    def _parse(self, url: str | URL) -> _Target:
        raw = str(url)
        try:
            parsed = url if isinstance(url, URL) else URL(raw)
            # raw_host, not host: it is the (IDNA-encoded) string aiohttp dials, and reading
            # it cannot fail on a malformed A-label the way decoding `host` can.
            scheme, host, port = parsed.scheme, parsed.raw_host, parsed.port
            has_userinfo = parsed.raw_user is not None or parsed.raw_password is not None
        except ValueError:  # includes UnicodeError
            raise ForbiddenURL("invalid", raw) from None
        if scheme not in _SCHEMES:
            raise ForbiddenURL("scheme", raw)
        # Credentials in a URL end up in logs and in aiohttp's Authorization header.
        if has_userinfo:
            raise ForbiddenURL("userinfo", raw)
        if not host or port is None:
            raise ForbiddenURL("no-host", raw)
        try:
            ip = parse_host_ip(host)
        except ValueError:
            raise ForbiddenURL("non-canonical-ip", raw) from None
        return _Target(scheme, host, port, ip)


class GuardedResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver and refuses the whole answer if any address
    is forbidden: whoever controls a zone can mix a public address with 127.0.0.1, and
    aiohttp would try them all in turn."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._owns_inner = inner is None
        self._inner: AbstractResolver = DefaultResolver() if inner is None else inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not results:
            raise OSError(f"{host!r} resolved to no addresses")
        for result in results:
            self._policy.check_host(result["host"])
        return results

    async def close(self) -> None:
        if self._owns_inner:
            await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector that checks every address it is about to dial.

    `_resolve_host` is the funnel of `_create_direct_connection`: it returns the list that
    is dialled, built from the resolver, the DNS cache, or (without calling the resolver)
    an IP literal. Checking its output covers all three, and every redirect hop or proxy
    connection would pass through it too.
    """

    def __init__(self, policy: AddressPolicy, *, limit: int, limit_per_host: int) -> None:
        self._policy = policy
        self._guarded_resolver = GuardedResolver(policy)
        super().__init__(
            resolver=self._guarded_resolver, limit=limit, limit_per_host=limit_per_host
        )

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        results = await super()._resolve_host(host, port, traces=traces)
        for result in results:
            self._policy.check_host(result["host"])
        return results

    async def close(self, *, abort_ssl: bool = False) -> None:
        await super().close(abort_ssl=abort_ssl)
        # We passed the resolver in, so aiohttp does not consider it its own to close.
        await self._guarded_resolver.close()


with warnings.catch_warnings():
    # aiohttp warns on subclassing ClientSession because its internals are not API. One
    # override is worth it: every verb, `request()` and `ws_connect()` go through
    # `_request`, so it is the single place where redirects and proxies can be refused.
    warnings.simplefilter("ignore", DeprecationWarning)

    class GuardedSession(aiohttp.ClientSession):
        """A ClientSession that never follows redirects and never uses a proxy."""

        ATTRS = aiohttp.ClientSession.ATTRS | frozenset({"_policy"})

        def __init__(self, *, policy: AddressPolicy, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._policy = policy

        async def _request(
            self, method: str, str_or_url: str | URL, **kwargs: Any
        ) -> aiohttp.ClientResponse:
            # A proxy would be dialled (and checked) instead of the target, which the proxy
            # then resolves unchecked.
            if kwargs.get("proxy") is not None:
                raise ForbiddenURL("proxy", str(str_or_url))
            # Scheme, credentials and legacy numeric hosts fail here with a clear reason;
            # the address itself is checked by the connector. Plain http is an endpoint
            # setting (checked when the URL is saved), not something this layer decides.
            self._policy.check_url(str_or_url, require_https=False)
            # Forced, not defaulted: `get()` passes allow_redirects=True explicitly, so an
            # explicit True cannot be told apart from the default. Callers see the 3xx.
            kwargs["allow_redirects"] = False
            return await super()._request(method, str_or_url, **kwargs)


def create_http_session(
    *,
    policy: AddressPolicy,
    connect_timeout_s: float = 10,
    total_timeout_s: float = 15,
    limit: int = 100,
    limit_per_host: int = 10,
    user_agent: str = "Relayport/0.1",
) -> aiohttp.ClientSession:
    """The outbound session: pooled keep-alive connections behind the SSRF guard."""
    return GuardedSession(
        policy=policy,
        connector=GuardedConnector(policy, limit=limit, limit_per_host=limit_per_host),
        # `connect` covers waiting for a pool slot, DNS, TCP and TLS: a saturated endpoint
        # then surfaces as a retryable timeout instead of an ever-growing queue.
        timeout=aiohttp.ClientTimeout(total=total_timeout_s, connect=connect_timeout_s),
        headers={"User-Agent": user_agent},
        # HTTP(S)_PROXY / NO_PROXY and .netrc would route around the guard or add credentials.
        trust_env=False,
        # One session serves every tenant: cookies set by one endpoint must not reach another
        # tenant's endpoint on the same host.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Callers bound what they read (delivery keeps 20,000 bytes), which also bounds a
        # compressed body's expansion.
        auto_decompress=True,
        raise_for_status=False,
    )


def classify_error(exc: BaseException) -> str:
    """One of "ssrf", "dns", "tls", "timeout", "connect", "http", "other".

    Delivery logs the kind with each attempt and splits retryable from permanent failures
    by it, so the set stays small and stable. "connect" means the TCP connection could not
    be opened or broke before a response; "http" means a response arrived but was bad.
    """
    for link in _chain(exc):
        # The guard's refusal wins even if a library wrapped it in something generic.
        if isinstance(link, ForbiddenAddress | ForbiddenURL):
            return "ssrf"
        if isinstance(link, HostNotResolved):
            return "dns"
    if isinstance(exc, aiohttp.ClientConnectorDNSError | socket.gaierror):
        return "dns"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError | aiohttp.ServerFingerprintMismatch):
        return "tls"
    # Before the connection errors: TimeoutError is an OSError, and aiohttp's
    # ServerTimeoutError is both a connection error and a TimeoutError.
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return "connect"
    if isinstance(
        exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError | HttpProcessingError
    ):
        return "http"
    return "other"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__
