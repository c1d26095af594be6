"""The request-level middleware (`relayport.core.edge` and `relayport.core.security`), driven
through HTTP on tiny apps."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, WebSocket
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relayport.core import errors
from relayport.core.context import request_id_var
from relayport.core.edge import EdgeMiddleware
from relayport.core.security import (
    BodyLimitMiddleware,
    ConcurrencyLimitMiddleware,
    InFlightGate,
    ProblemCORSMiddleware,
    client_ip,
    cors_kwargs,
)
from relayport.settings import HttpSettings

PROBLEM = "application/problem+json"


def base_app() -> FastAPI:
    app = FastAPI()
    errors.install(app)

    @app.get("/v1/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {
            "request_id": request.scope.get("state", {}).get("request_id"),
            "var": request_id_var.get(),
            "client_ip": request.scope.get("state", {}).get("client_ip"),
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def client(app: ASGIApp, **transport: Any) -> httpx.AsyncClient:
    base_url = transport.pop("base_url", "http://test")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **transport), base_url=base_url)


async def eventually(check: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


# --- request id -------------------------------------------------------------------------------


async def test_sane_incoming_request_id_is_kept_bound_and_echoed() -> None:
    app = base_app()
    app.add_middleware(EdgeMiddleware)
    async with client(app) as c:
        r = await c.get("/v1/echo", headers={"X-Request-ID": "edge-7f3a.b:c_d"})
    assert r.headers["x-request-id"] == "edge-7f3a.b:c_d"
    assert r.json()["request_id"] == "edge-7f3a.b:c_d"
    assert r.json()["var"] == "edge-7f3a.b:c_d"
    assert request_id_var.get() is None  # reset after the request


@pytest.mark.parametrize(
    "incoming",
    ["a" * 200, "<script>alert(1)</script>", "", "has space", "new\\nline", "é"],
    ids=["too-long", "script", "empty", "space", "backslash", "non-ascii"],
)
async def test_insane_incoming_request_id_is_replaced(incoming: str) -> None:
    app = base_app()
    app.add_middleware(EdgeMiddleware)
    async with client(app) as c:
        r = await c.get("/v1/echo", headers={b"X-Request-ID": incoming.encode("utf-8")})
    echoed = r.headers["x-request-id"]
    assert echoed != incoming
    assert len(echoed) == 32
    assert int(echoed, 16) >= 0
    assert r.json()["request_id"] == echoed


async def test_missing_request_id_is_generated_fresh_per_request() -> None:
    app = base_app()
    app.add_middleware(EdgeMiddleware)
    async with client(app) as c:
        first = (await c.get("/v1/echo")).headers["x-request-id"]
        second = (await c.get("/v1/echo")).headers["x-request-id"]
    assert first != second


async def test_request_id_is_on_middleware_error_responses() -> None:
    app = base_app()
    app.add_middleware(BodyLimitMiddleware, max_bytes=1)
    app.add_middleware(EdgeMiddleware)
    async with client(app) as c:
        r = await c.post("/v1/echo", content=b"too big", headers={"X-Request-ID": "r1"})
    assert r.status_code == 413
    assert r.headers["x-request-id"] == "r1"


# --- security headers -------------------------------------------------------------------------


def headers_app() -> FastAPI:
    app = base_app()

    @app.get("/v1/cached")
    async def cached() -> Response:
        return JSONResponse(
            {}, headers={"Cache-Control": "max-age=60", "X-Frame-Options": "SAMEORIGIN"}
        )

    app.add_middleware(EdgeMiddleware)
    return app


async def test_api_responses_carry_strict_security_headers() -> None:
    async with client(headers_app()) as c:
        r = await c.get("/v1/echo")
    h = r.headers
    assert h["x-content-type-options"] == "nosniff"
    assert h["x-frame-options"] == "DENY"
    assert h["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert h["cache-control"] == "no-store"
    assert "strict-transport-security" not in h  # plain http
    # Document-only headers do nothing on JSON: they go on pages.
    assert "referrer-policy" not in h
    assert "cross-origin-opener-policy" not in h


async def test_pages_also_carry_the_document_headers() -> None:
    app = headers_app()

    @app.get("/v1/page")
    async def page() -> Response:
        return Response("<p>hi</p>", media_type="text/html")

    async with client(app) as c:
        for path in ("/v1/page", "/docs"):
            h = (await c.get(path)).headers
            assert h["referrer-policy"] == "no-referrer", path
            assert h["cross-origin-opener-policy"] == "same-origin", path
            assert h["x-frame-options"] == "DENY", path


async def test_hsts_only_over_https() -> None:
    async with client(headers_app(), base_url="https://test") as c:
        r = await c.get("/v1/echo")
    assert r.headers["strict-transport-security"].startswith("max-age=")


async def test_headers_a_route_set_are_kept_not_duplicated() -> None:
    async with client(headers_app()) as c:
        r = await c.get("/v1/cached")
    assert r.headers.get_list("cache-control") == ["max-age=60"]
    assert r.headers.get_list("x-frame-options") == ["SAMEORIGIN"]
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_csp_is_relaxed_only_for_the_docs_pages() -> None:
    async with client(headers_app()) as c:
        docs = await c.get("/docs")
        redoc = await c.get("/redoc")
        api = await c.get("/v1/echo")
        lookalike = await c.get("/docsx")
    assert docs.status_code == 200
    for page in (docs, redoc):
        csp = page.headers["content-security-policy"]
        assert "script-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'" in csp
        assert "https://fastapi.tiangolo.com" in csp
        assert "data:" in csp
        assert "frame-ancestors 'none'" in csp
    # The Swagger page really loads from where the policy allows.
    assert "https://cdn.jsdelivr.net/npm/swagger-ui-dist" in docs.text
    assert "jsdelivr" not in api.headers["content-security-policy"]
    assert "jsdelivr" not in lookalike.headers["content-security-policy"]


# --- body limit -------------------------------------------------------------------------------


class Item(BaseModel):
    text: str


def body_app(max_bytes: int, **kw: Any) -> tuple[ASGIApp, dict[str, int]]:
    """A body-limited app plus counters of what reached the route and of receive() calls."""
    seen = {"route_calls": 0, "receives": 0}
    app = FastAPI()
    errors.install(app)

    @app.post("/v1/raw")
    async def raw(request: Request) -> dict[str, int]:
        seen["route_calls"] += 1
        return {"size": len(await request.body())}

    @app.post("/v1/model")
    async def model(item: Item) -> dict[str, int]:
        seen["route_calls"] += 1
        return {"size": len(item.text)}

    @app.post("/v1/swallow")
    async def swallow(request: Request) -> dict[str, bool]:
        try:
            await request.body()
        except Exception:
            # An app that hides the failure and keeps reading: it must get no more bytes,
            # and its 200 must not reach the client.
            with contextlib.suppress(Exception):
                while (await request.receive()).get("more_body"):
                    pass
            return {"swallowed": True}
        return {"swallowed": False}

    @app.post("/v1/ingest/big")
    async def big(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes, **kw)

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            seen["receives"] += 1
            return await receive()

        await app(scope, counted, send)

    return counting, seen


async def test_declared_oversized_body_is_refused_unread() -> None:
    app, seen = body_app(100)
    async with client(app) as c:
        r = await c.post("/v1/raw", content=b"x" * 101)
    assert r.status_code == 413
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["type"] == "/problems/payload-too-large"
    assert r.headers["connection"] == "close"
    assert seen == {"route_calls": 0, "receives": 0}


def chunks(count: int, size: int, pulled: list[int]) -> Callable[[], AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        for _ in range(count):
            pulled.append(size)
            yield b"x" * size

    return gen


@pytest.mark.parametrize("path", ["/v1/raw", "/v1/model", "/v1/swallow"])
async def test_streamed_body_over_limit_is_cut_off_with_413(path: str) -> None:
    app, _ = body_app(120)
    pulled: list[int] = []
    async with client(app) as c:
        r = await c.post(path, content=chunks(10, 50, pulled)())
    assert "content-length" not in r.request.headers  # really chunked
    assert r.status_code == 413
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["type"] == "/problems/payload-too-large"
    # 50 + 50 + 50 crosses 120: reading stopped there, 7 chunks never pulled.
    assert sum(pulled) == 150


async def test_body_exactly_at_the_limit_passes() -> None:
    app, _ = body_app(100)
    async with client(app) as c:
        declared = await c.post("/v1/raw", content=b"x" * 100)
        streamed = await c.post("/v1/raw", content=chunks(4, 25, [])())
    assert declared.status_code == 200
    assert declared.json() == {"size": 100}
    assert streamed.status_code == 200
    assert streamed.json() == {"size": 100}


async def test_limit_for_overrides_the_limit_per_path() -> None:
    def limit_for(scope: Scope) -> int | None:
        return 1_000 if scope["path"].startswith("/v1/ingest/") else None

    app, _ = body_app(100, limit_for=limit_for)
    async with client(app) as c:
        ingest = await c.post("/v1/ingest/big", content=b"x" * 500)
        other = await c.post("/v1/raw", content=b"x" * 500)
        over = await c.post("/v1/ingest/big", content=b"x" * 1_001)
    assert ingest.status_code == 200
    assert ingest.json() == {"size": 500}
    assert other.status_code == 413
    assert over.status_code == 413


# --- concurrency limit ------------------------------------------------------------------------


def held_app(gate: InFlightGate) -> tuple[FastAPI, asyncio.Event]:
    release = asyncio.Event()
    app = base_app()

    @app.get("/v1/slow")
    async def slow() -> dict[str, bool]:
        await release.wait()
        return {"done": True}

    app.add_middleware(ConcurrencyLimitMiddleware, gate=gate)
    return app, release


async def test_requests_beyond_the_limit_get_503_and_probes_still_answer() -> None:
    gate = InFlightGate(max_in_flight=2, retry_after_s=3)
    app, release = held_app(gate)
    async with client(app) as c:
        held = [asyncio.create_task(c.get("/v1/slow")) for _ in range(2)]
        await eventually(lambda: gate.in_flight == 2)
        rejected = await c.get("/v1/echo")
        probe = await c.get("/healthz")
        release.set()
        done = await asyncio.gather(*held)
    assert rejected.status_code == 503
    assert rejected.headers["content-type"] == PROBLEM
    assert rejected.headers["retry-after"] == "3"
    assert rejected.json()["type"] == "/problems/overloaded"
    assert probe.status_code == 200
    assert [r.status_code for r in done] == [200, 200]
    assert gate.in_flight == 0


async def test_draining_refuses_new_requests_and_waits_for_in_flight_ones() -> None:
    gate = InFlightGate(max_in_flight=10)
    app, release = held_app(gate)
    async with client(app) as c:
        held = asyncio.create_task(c.get("/v1/slow"))
        await eventually(lambda: gate.in_flight == 1)
        gate.start_draining()
        refused = await c.get("/v1/echo")
        probe = await c.get("/healthz")
        assert await gate.wait_idle(0.05) is False
        release.set()
        assert await gate.wait_idle(2) is True
        finished = await held
    assert refused.status_code == 503
    assert refused.json()["type"] == "/problems/unavailable"
    assert "retry-after" in refused.headers
    assert probe.status_code == 200
    assert finished.status_code == 200


def test_middleware_built_from_settings_exposes_its_gate() -> None:
    mw = ConcurrencyLimitMiddleware(base_app(), max_in_flight=5, retry_after_s=0.2)
    assert mw.gate.max_in_flight == 5
    assert mw.gate.retry_after_s == 1  # whole seconds, rounded up
    assert mw.draining is False
    mw.start_draining()
    assert mw.draining is True
    with pytest.raises(TypeError):
        ConcurrencyLimitMiddleware(base_app())


# --- client ip --------------------------------------------------------------------------------

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def scope_from(peer: str | None, xff: list[str] | None = None, proto: str | None = None) -> Scope:
    headers = [(b"x-forwarded-for", v.encode()) for v in xff or []]
    if proto:
        headers.append((b"x-forwarded-proto", proto.encode()))
    return {
        "type": "http",
        "client": (peer, 4711) if peer else None,
        "headers": headers,
        "path": "/",
        "scheme": "http",
    }


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.9", [], PROXIES, "203.0.113.9"),
        ("203.0.113.9", ["1.2.3.4"], [], "203.0.113.9"),  # no proxies configured
        ("203.0.113.9", ["10.0.0.1"], PROXIES, "203.0.113.9"),  # spoofed by an untrusted peer
        ("10.0.0.5", ["203.0.113.7"], PROXIES, "203.0.113.7"),
        ("10.0.0.5", ["203.0.113.7, 10.1.2.3"], PROXIES, "203.0.113.7"),  # two proxy hops
        ("10.0.0.5", ["6.6.6.6, 203.0.113.7"], PROXIES, "203.0.113.7"),  # client-forged left part
        ("10.0.0.5", ["6.6.6.6", "203.0.113.7"], PROXIES, "203.0.113.7"),  # split header lines
        ("10.0.0.5", ["1.1.1.1, not-an-ip"], PROXIES, "10.0.0.5"),  # garbage stops the walk
        ("10.0.0.5", ["1.1.1.1, not-an-ip, 10.9.9.9"], PROXIES, "10.9.9.9"),
        ("10.0.0.5", ["10.7.7.7"], PROXIES, "10.7.7.7"),  # all hops ours: farthest one
        ("10.0.0.5", ["203.0.113.7:5555"], PROXIES, "203.0.113.7"),  # port tolerated
        ("fd00::1", ["[2001:db8::1]:443"], PROXIES, "2001:db8::1"),
        ("::ffff:10.0.0.5", ["198.51.100.4"], PROXIES, "198.51.100.4"),  # dual-stack socket
        ("10.0.0.5", [""], PROXIES, "10.0.0.5"),
        (None, ["1.2.3.4"], PROXIES, "unknown"),  # unix socket
    ],
)
def test_client_ip(peer: str | None, xff: list[str], trusted: list[Any], expected: str) -> None:
    assert client_ip(scope_from(peer, xff), trusted) == expected


@given(xff=st.lists(st.text(max_size=40), max_size=5))
def test_untrusted_peer_is_the_answer_whatever_the_header_says(xff: list[str]) -> None:
    scope = scope_from("198.51.100.20")
    scope["headers"] = [(b"x-forwarded-for", v.encode("utf-8")) for v in xff]
    assert client_ip(scope, PROXIES) == "198.51.100.20"


@given(xff=st.lists(st.text(max_size=40), max_size=5))
def test_forwarded_client_ip_is_always_an_address(xff: list[str]) -> None:
    scope = scope_from("10.0.0.1")
    scope["headers"] = [(b"x-forwarded-for", v.encode("utf-8")) for v in xff]
    ipaddress.ip_address(client_ip(scope, PROXIES))  # never garbage from the header


async def test_client_ip_middleware_stores_the_address_and_trusted_https() -> None:
    app = base_app()
    app.add_middleware(EdgeMiddleware, trusted_proxies=["10.0.0.0/8"])
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    async with client(app, client=("10.0.0.5", 1000)) as via_proxy:
        r = await via_proxy.get("/v1/echo", headers=forwarded)
    assert r.json()["client_ip"] == "203.0.113.7"
    assert "strict-transport-security" in r.headers
    async with client(app, client=("198.51.100.1", 1000)) as direct:
        spoofed = await direct.get("/v1/echo", headers=forwarded)
    assert spoofed.json()["client_ip"] == "198.51.100.1"
    assert "strict-transport-security" not in spoofed.headers


# --- websockets and lifespan ------------------------------------------------------------------


def ws_app(gate: InFlightGate | None = None) -> FastAPI:
    app = FastAPI()

    @app.websocket("/v1/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(
            {
                "request_id": websocket.scope["state"]["request_id"],
                "ip": websocket.scope["state"]["client_ip"],
            }
        )
        await websocket.close()

    app.add_middleware(ConcurrencyLimitMiddleware, gate=gate or InFlightGate(1))
    app.add_middleware(EdgeMiddleware)
    return app


async def ws_session(app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    """Drive one WebSocket connection at the ASGI level; return what the app sent."""
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/v1/ws",
        "raw_path": b"/v1/ws",
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": headers,
        "client": ("198.51.100.3", 5000),
        "server": ("test", 80),
        "subprotocols": [],
    }
    inbox = [{"type": "websocket.connect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_websocket_gets_request_id_and_client_ip() -> None:
    sent = await ws_session(ws_app(), [(b"x-request-id", b"ws-1")])
    accept = sent[0]
    assert accept["type"] == "websocket.accept"
    assert (b"x-request-id", b"ws-1") in accept["headers"]
    assert sent[1]["text"] == '{"request_id":"ws-1","ip":"198.51.100.3"}'


async def test_websocket_is_refused_while_draining() -> None:
    gate = InFlightGate(1)
    gate.start_draining()
    sent = await ws_session(ws_app(gate), [])
    assert sent == [{"type": "websocket.close", "code": 1012}]


MIDDLEWARE: list[Callable[[ASGIApp], ASGIApp]] = [
    EdgeMiddleware,
    lambda app: EdgeMiddleware(app, trusted_proxies=["10.0.0.0/8"], security_headers=None),
    lambda app: BodyLimitMiddleware(app, max_bytes=1),
    lambda app: ConcurrencyLimitMiddleware(app, max_in_flight=1),
]


@pytest.mark.parametrize("wrap", MIDDLEWARE)
async def test_lifespan_passes_through_untouched(wrap: Callable[[ASGIApp], ASGIApp]) -> None:
    seen: list[Scope] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def silent(*args: Any) -> Any:
        raise AssertionError("middleware must not talk on a lifespan scope")

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    await wrap(inner)(scope, silent, silent)
    assert seen == [{"type": "lifespan", "asgi": {"version": "3.0"}}]


# --- CORS -------------------------------------------------------------------------------------


def test_cors_kwargs_is_an_allow_list() -> None:
    assert cors_kwargs(HttpSettings()) is None
    kwargs = cors_kwargs(HttpSettings(cors_origins=["https://app.example.com/"]))
    assert kwargs is not None
    assert kwargs["allow_origins"] == ["https://app.example.com"]
    assert kwargs["allow_credentials"] is False
    for bad in ["*", "https://app.example.com/path", "app.example.com", "ftp://x"]:
        with pytest.raises(ValueError, match="CORS origin"):
            cors_kwargs(HttpSettings(cors_origins=[bad]))


async def test_rejected_preflight_is_problem_json_and_allowed_one_passes() -> None:
    app = base_app()
    kwargs = cors_kwargs(HttpSettings(cors_origins=["https://app.example.com"]))
    assert kwargs is not None
    app.add_middleware(ProblemCORSMiddleware, **kwargs)
    preflight = {"Access-Control-Request-Method": "GET"}
    async with client(app) as c:
        bad = await c.options("/v1/echo", headers={"Origin": "https://evil.example", **preflight})
        good = await c.options(
            "/v1/echo", headers={"Origin": "https://app.example.com", **preflight}
        )
        simple = await c.get("/v1/echo", headers={"Origin": "https://app.example.com"})
    assert bad.status_code == 400
    assert bad.headers["content-type"] == PROBLEM
    assert bad.json()["type"] == "/problems/cors-rejected"
    assert "access-control-allow-origin" not in bad.headers
    assert good.status_code == 200
    assert good.headers["access-control-allow-origin"] == "https://app.example.com"
    assert simple.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "X-Request-ID" in simple.headers["access-control-expose-headers"]


# --- the edge as one layer --------------------------------------------------------------------


async def test_edge_adds_inner_layers_headers_once_and_can_skip_security_headers() -> None:
    app = base_app()

    @app.get("/v1/limited")
    async def limited(request: Request) -> Response:
        # What RateLimitMiddleware leaves for the edge; the route's own copy wins.
        request.scope["state"]["response_headers"] = [
            (b"ratelimit-limit", b"10"),
            (b"ratelimit-remaining", b"9"),
        ]
        return JSONResponse({}, headers={"RateLimit-Remaining": "3"})

    app.add_middleware(EdgeMiddleware, security_headers=None)
    async with client(app) as c:
        r = await c.get("/v1/limited", headers={"X-Request-ID": "edge-1"})
    assert r.headers.get_list("ratelimit-limit") == ["10"]
    assert r.headers.get_list("ratelimit-remaining") == ["3"]
    assert r.headers.get_list("x-request-id") == ["edge-1"]
    assert "x-frame-options" not in r.headers
    assert "content-security-policy" not in r.headers
