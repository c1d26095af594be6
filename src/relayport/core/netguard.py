"""Which IP addresses outbound requests may reach: the pure half of the SSRF guard (no I/O).

The deny lists are written out as explicit network tables instead of trusting
`ipaddress.is_global` alone: the stdlib's idea of "global" has changed between Python
releases (3.11.10 / 3.12.4 rewrote the special-purpose tables) and still calls multicast
global, so the tables pin the behaviour and the stdlib is only a second opinion that can
add denials, never remove one.

Addresses that carry an IPv4 address inside an IPv6 one are decided as follows:

* IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``) and well-known NAT64
  (``64:ff9b::/96``) are decided on the embedded IPv4 address. The kernel (mapped) or a
  NAT64 gateway (64:ff9b) dials that IPv4 address, so it is the address that matters, and
  IPv6-only networks legitimately reach public IPv4 receivers through NAT64.
* 6to4 (``2002::/16``), Teredo (``2001::/32``) and local-use NAT64 (``64:ff9b:1::/48``)
  are denied outright. 6to4 and Teredo are deprecated tunnels (RFC 7526; Teredo is off by
  default on current Windows) whose relays decapsulate onto networks we cannot see, and
  Teredo's client address is XOR-obfuscated; every real 6to4 host also owns the public
  IPv4 address it embeds, which an operator can use instead. Local-use NAT64 is
  site-local by definition (RFC 8215) and its IPv4 position depends on the operator's
  prefix length, so it cannot be decoded reliably.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TypeAlias

IPAddress: TypeAlias = IPv4Address | IPv6Address

__all__ = ["IPAddress", "NonCanonicalIPv4", "is_forbidden_address", "parse_host_ip"]


def _v4(*rows: tuple[str, str]) -> tuple[tuple[IPv4Network, str], ...]:
    return tuple((IPv4Network(cidr), reason) for cidr, reason in rows)


def _v6(*rows: tuple[str, str]) -> tuple[tuple[IPv6Network, str], ...]:
    return tuple((IPv6Network(cidr), reason) for cidr, reason in rows)


# IANA IPv4 Special-Purpose Address Registry plus multicast and class E. The broadcast
# address comes before 240/4 only so that it gets its own, clearer reason.
_V4_DENIED = _v4(
    ("0.0.0.0/8", "unspecified"),  # "this network"; Linux dials 0.0.0.0 as localhost
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),  # includes the 169.254.169.254 cloud metadata service
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),  # deprecated 6to4 relay anycast
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)

# Native IPv6 ranges, checked after the embedded-IPv4 forms have been handled.
# 2001::/23 (IETF protocol assignments) is denied whole: its few globally reachable parts
# are protocol anycast and identifier ranges (PCP, TURN, AMT, AS112, ORCHIDv2) on which
# no webhook receiver or model server lives, so allowing them would only add surface.
_V6_DENIED = _v6(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "nat64"),
    ("100::/64", "reserved"),  # discard-only
    ("2001::/32", "teredo"),
    ("2001:2::/48", "benchmarking"),
    ("2001::/23", "reserved"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"),  # RFC 9637
    ("5f00::/16", "reserved"),  # SRv6 SIDs, RFC 9602
    ("fc00::/7", "ula"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)

# Forms whose last 32 bits are the IPv4 address that is really dialled.
_V6_EMBEDDING_V4 = _v6(
    ("::ffff:0:0/96", "ipv4-mapped"),
    ("64:ff9b::/96", "nat64"),
    ("::/96", "ipv4-compatible"),  # deprecated (RFC 4291); :: and ::1 are decided first
)

# IANA has allocated only 2000::/3 for global unicast; anything else left after the
# tables above is unassigned or special, and no public receiver can live there.
_V6_GLOBAL_UNICAST = IPv6Network("2000::/3")

# WHATWG URL: a host whose last label is a decimal or 0x-hex number is an IPv4 address,
# and inet_aton()/getaddrinfo() agree, reading 2130706433, 0x7f000001, 0177.0.0.1 and
# 127.1 as 127.0.0.1. Such hosts must be the canonical dotted quad or nothing.
_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")


_LOCALHOST = IPv4Address("127.0.0.1")


class NonCanonicalIPv4(ValueError):
    """A URL host that names an IPv4 address in a legacy numeric form."""


def is_forbidden_address(ip: IPAddress) -> str | None:
    """Why outbound requests must not reach `ip` (a reason slug), or None if it is public."""
    if isinstance(ip, IPv4Address):
        return _v4_reason(ip)
    return _v6_reason(ip)


def _v4_reason(ip: IPv4Address) -> str | None:
    for network, reason in _V4_DENIED:
        if ip in network:
            return reason
    if not ip.is_global:  # second opinion only: it may add a denial, never lift one
        return "non-global"
    return None


def _v6_reason(ip: IPv6Address) -> str | None:
    # :: and ::1 sit inside ::/96 (IPv4-compatible) and must not be decoded as 0.0.0.x.
    if int(ip) <= 1:
        return "unspecified" if int(ip) == 0 else "loopback"
    for network, kind in _V6_EMBEDDING_V4:
        if ip in network:
            embedded = IPv4Address(int(ip) & 0xFFFF_FFFF)
            return kind if _v4_reason(embedded) is not None else None
    for network, reason in _V6_DENIED:
        if ip in network:
            return reason
    if ip not in _V6_GLOBAL_UNICAST:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


def parse_host_ip(host: str) -> IPAddress | None:
    """The IP address a URL host (as yarl gives it, brackets removed) denotes, or None for
    a DNS name; localhost names denote 127.0.0.1. Raises NonCanonicalIPv4 for legacy
    numeric IPv4 forms and ValueError for malformed IPv6 literals."""
    name = host.rstrip(".").lower()  # resolvers ignore the root label: "127.0.0.1." is 127.0.0.1
    # RFC 6761: "localhost" and its subdomains always name the loopback interface, so they
    # are judged as 127.0.0.1 before any resolver (or /etc/hosts edit) gets a say.
    if name == "localhost" or name.endswith(".localhost"):
        return _LOCALHOST
    if ":" in name:
        return ip_address(name)  # keeps a zone id ("fe80::1%eth0"); membership ignores it
    if name and _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        try:
            return IPv4Address(name)  # accepts only a dotted quad without leading zeros
        except ValueError:
            raise NonCanonicalIPv4(
                f"{host!r} is not a canonical dotted-quad IPv4 address"
            ) from None
    return None
