"""The client's address: the socket peer, or what trusted proxies say about it.

`X-Forwarded-For` is only as trustworthy as whoever wrote each entry. Each proxy appends the
address it saw, so the list is read right to left and only while the writer is a proxy we run;
the first address a trusted proxy reports and that is not itself one of ours is the client.
Everything left of that point is client-supplied and never believed.

`relayport serve` runs uvicorn with `proxy_headers=False`, so this module is the one place that
interprets forwarding headers (X-Forwarded-Proto included, for HSTS and absolute URLs).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from starlette.types import Scope

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN = "unknown"
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


@functools.lru_cache(maxsize=4096)
def parse_ip(value: str) -> IPAddress | None:
    """An address from a header or socket entry, tolerating ports and IPv6 brackets.

    Cached: a busy instance sees the same few peers (its proxies, its heavy clients) on every
    request, and `ipaddress` parsing is the costliest step here. Results are immutable.
    """
    value = value.strip()
    if not value or len(value) > 64:  # longest IPv6 text with brackets, zone and port fits
        return None
    host = value
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return None
        host = value[1:end]
    elif value.count(":") == 1:  # IPv4 with a port; bare IPv6 has several colons
        host = value.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; compare them as IPv4.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(values: Iterable[str | IPNetwork]) -> list[IPNetwork]:
    return [
        v
        if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network)
        else ipaddress.ip_network(v, strict=False)
        for v in values
    ]


def _trusted(ip: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    # `in` across IP versions is False, not an error, so mixed lists are fine.
    return any(ip in net for net in networks)


def _forwarded_for(scope: Scope) -> list[str]:
    # Several X-Forwarded-For lines are one list in order (RFC 9110 field combination).
    hops: list[str] = []
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-forwarded-for":
            hops.extend(value.decode("latin-1").split(","))
    return hops


def _peer(scope: Scope) -> tuple[str | None, IPAddress | None]:
    client = scope.get("client")
    if not client:
        return None, None
    host = str(client[0])
    return host, parse_ip(host)


def client_ip(scope: Scope, trusted_proxies: Sequence[IPNetwork]) -> str:
    """The client address for rate limits, audit and logs.

    The socket peer, unless it is a trusted proxy: then `X-Forwarded-For` is walked from the
    right, skipping trusted hops, and the first untrusted address wins. An entry that is not an
    IP stops the walk (whatever lies left of it is client-controlled) and the nearest address
    known to be good is used. Without a peer (a Unix socket) the answer is "unknown".
    """
    host, peer = _peer(scope)
    if peer is None:
        return host or UNKNOWN
    if not trusted_proxies or not _trusted(peer, trusted_proxies):
        return str(peer)
    best = peer
    for raw in reversed(_forwarded_for(scope)):
        hop = parse_ip(raw)
        if hop is None:
            break
        best = hop
        if not _trusted(hop, trusted_proxies):
            break
    # When every hop is ours (an internal caller behind our own proxies) the farthest one is
    # the best answer there is.
    return str(best)


def forwarded_scheme(scope: Scope, trusted_proxies: Sequence[IPNetwork]) -> str | None:
    """The scheme a trusted proxy says the client used, from X-Forwarded-Proto."""
    _, peer = _peer(scope)
    if peer is None or not trusted_proxies or not _trusted(peer, trusted_proxies):
        return None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-forwarded-proto":
            # A proxy chain may list one scheme per hop; the first is the client's.
            proto = value.decode("latin-1").split(",", 1)[0].strip().lower()
            return _SCHEMES.get(proto)
    return None


def resolve_client(scope: Scope, trusted_proxies: Sequence[IPNetwork]) -> None:
    """Put the client address in `scope["state"]["client_ip"]` (http and websocket scopes);
    from a trusted proxy, apply X-Forwarded-Proto to `scope["scheme"]` too, so HTTPS
    terminated at the proxy still counts as HTTPS (HSTS, absolute URLs)."""
    scope.setdefault("state", {})["client_ip"] = client_ip(scope, trusted_proxies)
    if trusted_proxies:
        scheme = forwarded_scheme(scope, trusted_proxies)
        if scheme is not None:
            scope["scheme"] = scheme if scope["type"] == "http" else scheme.replace("http", "ws")
