"""The outbound HTTP client and its SSRF guard.

Only loopback is ever dialled: public addresses appear in pure-policy tests and behind fake
resolvers, never on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from relayport.core.http import (
    AddressPolicy,
    ForbiddenAddress,
    ForbiddenURL,
    GuardedConnector,
    GuardedResolver,
    HostNotResolved,
    OutboundError,
    classify_error,
    create_http_session,
)
from relayport.core.netguard import is_forbidden_address, parse_host_ip

# --- the pure policy -----------------------------------------------------------------------

DENIED = [
    ("0.0.0.0", "unspecified"),  # noqa: S104 - an address under test, not a bind
    ("0.255.255.255", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.255", "cgnat"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.169.254", "link-local"),
    ("169.254.0.1", "link-local"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.0.0.1", "reserved"),
    ("192.0.0.9", "reserved"),  # the stdlib calls this one global; the table does not
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "reserved"),
    ("192.168.0.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("224.0.0.1", "multicast"),  # the stdlib calls multicast global
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local"),
    ("fc00::1", "ula"),
    ("fd00::1", "ula"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("100::1", "reserved"),
    ("2001:2::1", "benchmarking"),
    ("2001:1ff::1", "reserved"),  # the rest of 2001::/23
    ("2001:10::1", "reserved"),  # deprecated ORCHID
    ("5f00::1", "reserved"),
    ("4000::1", "reserved"),  # outside 2000::/3, unallocated
    ("::ffff:0:7f00:1", "reserved"),  # SIIT "IPv4-translated" form: not global unicast
    ("::ffff:127.0.0.1", "ipv4-mapped"),
    ("::ffff:10.0.0.1", "ipv4-mapped"),
    ("::ffff:169.254.169.254", "ipv4-mapped"),
    ("::127.0.0.1", "ipv4-compatible"),
    ("64:ff9b::7f00:1", "nat64"),
    ("64:ff9b::a9fe:a9fe", "nat64"),
    ("64:ff9b:1::808:808", "nat64"),  # local-use NAT64 is denied whatever it embeds
    ("2002:7f00:1::", "6to4"),
    ("2002:808:808::", "6to4"),  # 6to4 is denied outright, even around a public IPv4
    ("2001::1", "teredo"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.32.0.1",
    "198.20.0.1",
    "::ffff:8.8.8.8",  # mapped and NAT64 forms are judged by the IPv4 address they carry
    "64:ff9b::808:808",
]


@pytest.mark.parametrize(("address", "reason"), DENIED)
def test_special_purpose_address_is_denied_with_its_reason(address: str, reason: str) -> None:
    assert is_forbidden_address(ip_address(address)) == reason
    with pytest.raises(ForbiddenAddress) as caught:
        AddressPolicy().check(ip_address(address))
    assert caught.value.reason == reason


@pytest.mark.parametrize("address", PUBLIC)
def test_public_address_is_allowed(address: str) -> None:
    assert is_forbidden_address(ip_address(address)) is None
    AddressPolicy().check(ip_address(address))


def test_allow_list_overrides_the_deny_list_only_for_its_own_networks() -> None:
    policy = AddressPolicy(["127.0.0.0/8", "fd00::/8"])
    policy.check(IPv4Address("127.0.0.1"))
    policy.check(IPv4Address("127.3.2.1"))
    policy.check(IPv6Address("::ffff:127.0.0.1"))  # dialled as 127.0.0.1 by the kernel
    policy.check(IPv6Address("fd00::1"))
    for other in ("10.0.0.1", "169.254.169.254", "::1", "64:ff9b::7f00:1"):
        with pytest.raises(ForbiddenAddress):
            policy.check(ip_address(other))


@pytest.mark.parametrize("cidr", ["not-a-network", "10.0.0.1/8", "300.0.0.0/8"])
def test_malformed_allow_list_entry_fails_at_start_up(cidr: str) -> None:
    with pytest.raises(ValueError, match=r"does not appear|has host bits set"):
        AddressPolicy([cidr])


# --- URLs ----------------------------------------------------------------------------------

REFUSED_URLS = [
    ("ftp://example.com/file", ForbiddenURL, "scheme"),
    ("file:///etc/passwd", ForbiddenURL, "scheme"),
    ("not a url", ForbiddenURL, "scheme"),
    ("http://user:pass@example.com/", ForbiddenURL, "userinfo"),
    ("https://token@example.com/", ForbiddenURL, "userinfo"),
    ("https://example.com:99999/", ForbiddenURL, "invalid"),
    ("http:///path-only", ForbiddenURL, "no-host"),
    ("http://example.com/hook", ForbiddenURL, "https-required"),
    ("http://127.0.0.1/", ForbiddenAddress, "loopback"),
    ("https://127.0.0.1./", ForbiddenAddress, "loopback"),
    ("http://[::1]/", ForbiddenAddress, "loopback"),
    ("https://[::ffff:127.0.0.1]/", ForbiddenAddress, "ipv4-mapped"),
    ("https://[fe80::1%25eth0]/", ForbiddenAddress, "link-local"),
    ("https://169.254.169.254/latest/meta-data/", ForbiddenAddress, "link-local"),
    ("https://[64:ff9b::a9fe:a9fe]/", ForbiddenAddress, "nat64"),
    ("http://localhost/", ForbiddenAddress, "loopback"),
    ("https://LOCALHOST./", ForbiddenAddress, "loopback"),
    ("https://api.localhost/", ForbiddenAddress, "loopback"),
    # Legacy numeric IPv4 forms: getaddrinfo() reads every one of these as 127.0.0.1.
    ("http://0x7f000001/", ForbiddenURL, "non-canonical-ip"),
    ("http://2130706433/", ForbiddenURL, "non-canonical-ip"),
    ("https://127.1/", ForbiddenURL, "non-canonical-ip"),
    ("https://0177.0.0.1/", ForbiddenURL, "non-canonical-ip"),
    ("https://0x7f.0.0.1/", ForbiddenURL, "non-canonical-ip"),
    ("https://%31%32%37.0.0.1/", ForbiddenURL, "non-canonical-ip"),
]


@pytest.mark.parametrize(("url", "error", "reason"), REFUSED_URLS)
def test_check_url_refuses(url: str, error: type[OutboundError], reason: str) -> None:
    with pytest.raises(error) as caught:
        AddressPolicy().check_url(url)
    assert caught.value.reason == reason  # type: ignore[attr-defined]


def test_getaddrinfo_really_reads_legacy_numeric_hosts_as_loopback() -> None:
    # Why check_url refuses them: yarl keeps these hosts verbatim and the resolver maps them.
    assert URL("http://0x7f000001/").host == "0x7f000001"
    assert URL("http://2130706433/").host == "2130706433"
    for host in ("0x7f000001", "2130706433"):
        try:
            infos = socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
        except socket.gaierror:  # pragma: no cover - a libc stricter than glibc's
            pytest.skip("this libc does not read legacy numeric IPv4 forms")
        assert {info[4][0] for info in infos} == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("url", "require_https", "allow"),
    [
        ("https://example.com/hook", True, []),
        ("https://8.8.8.8/", True, []),
        ("http://example.com/hook", False, []),
        ("http://127.0.0.1:9000/", True, ["127.0.0.0/8"]),  # literal inside the allow-list
        ("http://localhost:11434/api/tags", True, ["127.0.0.0/8"]),
        ("http://[fd00::5]/", True, ["fd00::/8"]),
    ],
)
def test_check_url_accepts(url: str, require_https: bool, allow: list[str]) -> None:
    AddressPolicy(allow).check_url(url, require_https=require_https)


def test_check_url_remembers_only_what_passed_and_for_its_own_https_rule() -> None:
    policy = AddressPolicy(["127.0.0.0/8"])
    for _ in range(2):  # the second call takes the remembered verdict
        policy.check_url("http://127.0.0.1:9000/a", require_https=False)
        with pytest.raises(ForbiddenAddress):
            policy.check_url("http://169.254.169.254/latest", require_https=False)
    strict = AddressPolicy()
    strict.check_url("http://example.com/hook", require_https=False)
    with pytest.raises(ForbiddenURL):  # passed without the https rule, not with it
        strict.check_url("http://example.com/hook", require_https=True)


@dataclass
class FakeResolver(AbstractResolver):
    answers: dict[str, list[str]]
    closed: bool = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(hostname=host, host=a, port=port, family=0, proto=0, flags=0)
            for a in self.answers[host]
        ]

    async def close(self) -> None:
        self.closed = True


DNS = FakeResolver(
    {
        "public.test": ["93.184.216.34", "2606:2800:220:1::1"],
        "mixed.test": ["93.184.216.34", "127.0.0.1"],  # an attacker's zone mixing answers
        "metadata.test": ["169.254.169.254"],
        "internal.test": ["127.0.0.5"],
    }
)


async def test_check_url_resolved_accepts_a_name_with_only_public_answers() -> None:
    await AddressPolicy().check_url_resolved("https://public.test/hook", resolver=DNS)


@pytest.mark.parametrize("host", ["mixed.test", "metadata.test"])
async def test_check_url_resolved_refuses_if_any_answer_is_forbidden(host: str) -> None:
    with pytest.raises(ForbiddenAddress):
        await AddressPolicy().check_url_resolved(f"https://{host}/", resolver=DNS)


async def test_plain_http_is_allowed_only_when_every_answer_is_in_the_allow_list() -> None:
    policy = AddressPolicy(["127.0.0.0/8"])
    await policy.check_url_resolved("http://internal.test:8080/", resolver=DNS)
    with pytest.raises(ForbiddenURL, match="https-required"):
        await policy.check_url_resolved("http://public.test/", resolver=DNS)
    await policy.check_url_resolved("http://public.test/", require_https=False, resolver=DNS)


async def test_check_url_resolved_reports_an_unknown_name() -> None:
    with pytest.raises(HostNotResolved) as caught:
        await AddressPolicy().check_url_resolved("https://nowhere.test/", resolver=DNS)
    assert classify_error(caught.value) == "dns"


async def test_check_url_resolved_finds_loopback_behind_localhost() -> None:
    with pytest.raises(ForbiddenAddress, match="loopback"):
        await AddressPolicy().check_url_resolved("http://localhost/")


async def test_guarded_resolver_refuses_mixed_answers_and_passes_clean_ones() -> None:
    resolver = GuardedResolver(AddressPolicy(), DNS)
    with pytest.raises(ForbiddenAddress):
        await resolver.resolve("mixed.test", 443)
    assert [r["host"] for r in await resolver.resolve("public.test", 443)] == [
        "93.184.216.34",
        "2606:2800:220:1::1",
    ]


# --- properties ----------------------------------------------------------------------------

V4_LOOPBACK = st.integers(0x7F00_0000, 0x7FFF_FFFF)
V4_PRIVATE_10 = st.integers(0x0A00_0000, 0x0AFF_FFFF)
V4_LINK_LOCAL = st.integers(0xA9FE_0000, 0xA9FE_FFFF)


@given(st.ip_addresses())
def test_any_address_gets_a_reason_or_none_and_nothing_else(ip: IPv4Address | IPv6Address) -> None:
    reason = is_forbidden_address(ip)
    if reason is None:
        AddressPolicy().check(ip)
        return
    assert isinstance(reason, str)
    assert reason
    with pytest.raises(ForbiddenAddress) as caught:
        AddressPolicy().check(ip)
    assert caught.value.reason == reason


@given(st.one_of(V4_LOOPBACK, V4_PRIVATE_10, V4_LINK_LOCAL))
def test_internal_ipv4_is_denied_plain_mapped_and_through_nat64(value: int) -> None:
    forms: list[IPv4Address | IPv6Address] = [
        IPv4Address(value),
        IPv6Address((0xFFFF << 32) | value),  # ::ffff:a.b.c.d
        IPv6Address((0x0064_FF9B << 96) | value),  # 64:ff9b::a.b.c.d
        IPv6Address(value),  # ::a.b.c.d (IPv4-compatible)
        IPv6Address((0x2002 << 112) | (value << 80)),  # 6to4
    ]
    for form in forms:
        assert is_forbidden_address(form) is not None, form


@given(st.integers(0, 2**32 - 1))
def test_mapped_and_nat64_forms_follow_the_embedded_ipv4_decision(value: int) -> None:
    plain_denied = is_forbidden_address(IPv4Address(value)) is not None
    assert (is_forbidden_address(IPv6Address((0xFFFF << 32) | value)) is not None) == plain_denied
    nat64 = IPv6Address((0x0064_FF9B << 96) | value)
    assert (is_forbidden_address(nat64) is not None) == plain_denied


@given(st.text())
@example("HTTP://»⒈")  # a host whose IDNA decoding fails inside yarl
def test_arbitrary_url_text_is_refused_only_with_outbound_errors(text: str) -> None:
    try:
        AddressPolicy().check_url(text)
        AddressPolicy().check_url(f"https://{text}/")
    except OutboundError:
        pass


@given(st.text(alphabet="0123456789abcdefxX.:%[]", max_size=40))
def test_numeric_looking_hosts_parse_or_fail_with_value_error(host: str) -> None:
    with contextlib.suppress(ValueError):
        parse_host_ip(host)


# --- real sockets on loopback --------------------------------------------------------------


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server that counts connections, so "never contacted" is provable."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *header_lines = head.split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (h.split(":", 1) for h in header_lines if h)
                }
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, path, headers))
                if path == "/slow":
                    await reader.read()  # never answer; returns when the client gives up
                    return
                extra = ""
                status = "200 OK"
                if path == "/redirect":
                    status = "302 Found"
                    extra = f"Location: {self.url('/target')}\r\n"
                elif path == "/cookie":
                    extra = "Set-Cookie: sid=tenant-a-secret; Path=/\r\n"
                writer.write(
                    f"HTTP/1.1 {status}\r\n{extra}Content-Length: 2\r\n\r\nok".encode("latin-1")
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    server = await asyncio.start_server(rec.serve, "127.0.0.1", 0)
    rec.port = server.sockets[0].getsockname()[1]
    async with server:
        yield rec


LOOPBACK = AddressPolicy(["127.0.0.0/8", "::1/128"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_session_refuses_loopback_before_any_connection(
    receiver: Receiver, host: str
) -> None:
    async with create_http_session(policy=AddressPolicy()) as session:
        with pytest.raises(ForbiddenAddress) as caught:
            async with session.get(receiver.url("/", host=host)):
                pass
    assert classify_error(caught.value) == "ssrf"
    assert receiver.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0x7f000001"])
async def test_connector_alone_refuses_loopback_literals_and_names(
    receiver: Receiver, host: str
) -> None:
    # No URL pre-check here: the connector is what stands between any caller and the socket.
    connector = GuardedConnector(AddressPolicy(), limit=10, limit_per_host=10)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(ForbiddenAddress):
            async with session.get(receiver.url("/", host=host)):
                pass
    assert receiver.connections == 0


async def test_connector_alone_cannot_be_reached_by_decimal_ipv4(receiver: Receiver) -> None:
    connector = GuardedConnector(AddressPolicy(), limit=10, limit_per_host=10)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises((ForbiddenAddress, aiohttp.InvalidURL)):
            async with session.get(receiver.url("/", host="2130706433")):
                pass
    assert receiver.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_allow_listed_loopback_is_reached(receiver: Receiver, host: str) -> None:
    async with (
        create_http_session(policy=LOOPBACK) as session,
        session.get(receiver.url("/ok", host=host)) as response,
    ):
        assert response.status == 200
        assert await response.text() == "ok"
    assert receiver.requests[0][2]["user-agent"] == "Relayport/0.1"


async def test_redirect_is_returned_not_followed(receiver: Receiver) -> None:
    async with create_http_session(policy=LOOPBACK) as session:
        async with session.get(receiver.url("/redirect")) as response:
            assert response.status == 302
            assert response.headers["Location"] == receiver.url("/target")
        # Even an explicit request to follow is overridden.
        async with session.post(receiver.url("/redirect"), data=b"{}") as response:
            assert response.status == 302
        async with session.request(
            "GET", receiver.url("/redirect"), allow_redirects=True
        ) as response:
            assert response.status == 302
    assert [path for _, path, _ in receiver.requests] == ["/redirect"] * 3


async def test_proxy_is_refused(receiver: Receiver) -> None:
    async with create_http_session(policy=LOOPBACK) as session:
        with pytest.raises(ForbiddenURL, match="proxy"):
            async with session.get("https://example.com/", proxy=receiver.url()):
                pass
    assert receiver.connections == 0


async def test_environment_proxy_is_ignored(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "")
    async with (
        create_http_session(policy=LOOPBACK) as session,
        session.get(receiver.url("/ok")) as response,
    ):
        assert response.status == 200


async def test_cookies_from_one_endpoint_are_never_sent_on(receiver: Receiver) -> None:
    async with create_http_session(policy=LOOPBACK) as session:
        for path in ("/cookie", "/ok"):
            # A name, not an IP: aiohttp's default jar already ignores cookies from IPs.
            async with session.get(receiver.url(path, host="localhost")) as response:
                assert response.status == 200
    assert "cookie" not in receiver.requests[1][2]


async def test_connections_are_kept_alive_and_reused(receiver: Receiver) -> None:
    async with create_http_session(policy=LOOPBACK) as session:
        for _ in range(3):
            async with session.get(receiver.url("/ok")) as response:
                await response.read()
    assert (receiver.connections, len(receiver.requests)) == (1, 3)


async def test_slow_receiver_is_classified_as_timeout(receiver: Receiver) -> None:
    async with create_http_session(policy=LOOPBACK, total_timeout_s=0.2) as session:
        with pytest.raises(asyncio.TimeoutError) as caught:
            async with session.get(receiver.url("/slow")):
                pass
    assert classify_error(caught.value) == "timeout"


async def test_refused_connection_is_classified_as_connect() -> None:
    with socket.socket() as sock:  # bind, then close: the port is very likely unused now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with create_http_session(policy=LOOPBACK) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            async with session.get(f"http://127.0.0.1:{port}/"):
                pass
    assert classify_error(caught.value) == "connect"


# --- error classification ------------------------------------------------------------------

_KEY = ConnectionKey("hooks.example.com", 443, True, True, None, None, None)
_INFO = RequestInfo(URL("https://hooks.example.com/"), "POST", CIMultiDictProxy(CIMultiDict()))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ForbiddenAddress("loopback", IPv4Address("127.0.0.1")), "ssrf"),
        (ForbiddenURL("userinfo", "http://u:p@h/"), "ssrf"),
        (HostNotResolved("nowhere.test"), "dns"),
        (aiohttp.ClientConnectorDNSError(_KEY, socket.gaierror(-2, "unknown")), "dns"),
        (aiohttp.ClientConnectorCertificateError(_KEY, ssl.CertificateError("bad")), "tls"),
        (aiohttp.ClientConnectorSSLError(_KEY, ssl.SSLError(1, "handshake")), "tls"),
        (aiohttp.ServerFingerprintMismatch(b"a", b"b", "h", 443), "tls"),
        (aiohttp.ServerTimeoutError("read"), "timeout"),
        (aiohttp.ConnectionTimeoutError("connect"), "timeout"),
        (TimeoutError(), "timeout"),
        (aiohttp.ClientConnectorError(_KEY, ConnectionRefusedError(111, "refused")), "connect"),
        (aiohttp.ServerDisconnectedError(), "connect"),
        (ConnectionResetError(), "connect"),
        (aiohttp.ClientResponseError(_INFO, (), status=500), "http"),
        (aiohttp.ClientPayloadError("truncated"), "http"),
        (aiohttp.InvalidURL("nope"), "other"),
        (ValueError("x"), "other"),
    ],
)
def test_classify_error(exc: BaseException, kind: str) -> None:
    assert classify_error(exc) == kind


def test_classify_error_finds_the_guard_behind_a_wrapper() -> None:
    outer = RuntimeError("delivery failed")
    outer.__cause__ = ForbiddenAddress("private", IPv4Address("10.0.0.1"))
    assert classify_error(outer) == "ssrf"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://user:pass@127.0.0.1:{port}/ok", "userinfo"),
        ("http://0x7f000001:{port}/ok", "non-canonical-ip"),
        ("ftp://127.0.0.1:{port}/ok", "scheme"),
    ],
)
async def test_session_refuses_bad_urls_even_to_allow_listed_hosts(
    receiver: Receiver, url: str, reason: str
) -> None:
    async with create_http_session(policy=LOOPBACK) as session:
        with pytest.raises(ForbiddenURL) as caught:
            async with session.get(url.format(port=receiver.port)):
                pass
    assert caught.value.reason == reason
    assert receiver.connections == 0
