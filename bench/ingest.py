"""Inbound webhook throughput: open-loop load on Relayport's ingest endpoint and two baselines.

    .venv/bin/python -m bench.ingest [--rates 500,1000,2000,3000,4000,5000,6000] [--duration 8]
        [--warmup 1] [--profiles embedded,postgres] [--max-inflight 2000] [--no-worker]
        [--worker-nice 10] [--client raw|aiohttp] [--ingest NAME=VALUE ...] [--py-spy DIR]
        [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/0] [--amqp-url amqp://guest:guest@127.0.0.1:5672]

About 6 minutes with the defaults (4 targets x 7 rates x (warm-up + duration + drain)).

Targets, each a real uvicorn process on 127.0.0.1 (one worker, uvloop + httptools, access log
off), started and stopped by this script:

  bare      POST /hook on a bare Starlette app answering 202: the HTTP stack's limit;
  verify    POST /hook on a FastAPI app that checks the GitHub signature with
            `relayport.ingest.signatures.verify` and answers 202 storing nothing: the limit
            without durability;
  relayport POST /v1/ingest/{source_id}, per profile: `embedded` (SQLite in a temp dir,
            in-process broker and worker) and `postgres` (a fresh database, dropped at the end;
            a fresh RabbitMQ vhost made with rabbitmqctl, deleted at the end; Redis for the
            limits under a unique key prefix; plus one `relayport worker` process unless
            --no-worker). Source, tenant and IP limits and quotas are raised so nothing is refused.

Load: a separate process on uvloop, with plain keep-alive connections and httptools (`--client
raw`, the default: 10-20% of a core at 2,000-6,000 req/s) or aiohttp's client (`--client
aiohttp`, 70-100% of a core there, CPU the server under test then does not get on a small
machine), OPEN loop. Requests go out on a fixed schedule at
the offered rate whatever the answers; latency counts from the scheduled send time, so queueing
(in the server or the client) shows. At most --max-inflight requests are outstanding; a request
whose slot comes while the cap is reached is not sent and counts as an error ("in-flight cap").
Each request is a GitHub-signed ~1 KiB JSON body with a unique X-GitHub-Delivery, so every one
is a new event, never a duplicate. The first --warmup seconds of each rate are sent but not
counted. accepted/s = 2xx answers to the measured requests / (time from the window's start to
the last measured answer, at least --duration). Answers still missing 5 s after the window are
errors.

Goals (issue 3): >= 3,000 accepted/s durable on PostgreSQL; p99 <= 25 ms at 1,000 req/s offered;
>= 40% of the no-durability (verify) endpoint's accepted/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from fastapi import Request  # at module level: the endpoint's annotation is resolved here

from bench.http_overhead import (
    ROOT,
    BenchError,
    Server,
    _clean_env,
    _free_port,
    _percentile,
    _py_spy_binary,
    _stop_py_spy,
    backing,
    cpu_seconds,
    machine_info,
    machine_ticks,
    make_api_key,
    report_server_log,
    stop_server,
    wait_ready,
)

PROFILES = ("embedded", "postgres")
SECRET_ENV = "BENCH_INGEST_SECRET"  # noqa: S105 (the name of a variable)
BODY_BYTES = 1024
DRAIN_S = 5.0
REQUEST_TIMEOUT_S = 10.0
GOAL_RPS = 3000
GOAL_P99_MS = 25.0
GOAL_P99_RATE = 1000
GOAL_RATIO = 0.40
# Never refuse a webhook: per-source buckets (ingest) and tenant/IP buckets + quota (ratelimit).
INGEST_LIMITS = {
    "RELAYPORT_INGEST__SOURCE_REQUESTS_PER_SECOND": "1000000000",
    "RELAYPORT_INGEST__SOURCE_BURST": str(10**9),
}


# --- the two baseline apps (uvicorn --factory targets) ----------------------------------------


def bare_app() -> Any:
    """A Starlette app with one POST route answering 202: the HTTP stack's limit."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def hook(request: Request) -> Response:
        await request.body()
        return Response(b'{"status":"accepted"}', 202, media_type="application/json")

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


def verify_app() -> Any:
    """FastAPI + the same GitHub signature check, nothing stored: the limit without durability."""
    from fastapi import FastAPI, Response

    from relayport.ingest.signatures import SignatureError, verify

    secret_list = [os.environ[SECRET_ENV]]
    app = FastAPI()

    @app.post("/hook", status_code=202)
    async def hook(request: Request) -> Response:
        body = await request.body()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}
        try:
            verified = verify("github", headers, body, secret_list, now=time.time())
        except SignatureError as exc:
            return Response(f'{{"reason":"{exc.reason}"}}', 401, media_type="application/json")
        return Response(
            json.dumps({"status": "accepted", "event_id": verified.delivery_id}),
            202,
            media_type="application/json",
        )

    return app


def start(target: str, env: dict[str, str], log_path: Path) -> Server:
    """Like `bench.http_overhead.start_server`, for any `module:factory`."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", "--factory", target,
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning", "--no-server-header", "--no-proxy-headers",
        "--timeout-graceful-shutdown", "5", "--backlog", "4096",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


# --- load generator (its own process) ---------------------------------------------------------


def _requests(n: int, secret: str) -> list[tuple[bytes, dict[str, str]]]:
    from relayport.ingest.signatures import sign

    run = secrets.token_hex(4)
    now = time.time()
    out = []
    for i in range(n):
        delivery = f"bench-{run}-{i}"
        doc: dict[str, Any] = {
            "action": "opened",
            "number": i,
            "delivery": delivery,
            "repository": {"id": 1296269, "full_name": "octocat/Hello-World", "private": False},
            "sender": {"login": "octocat", "id": 1, "type": "User"},
            "padding": "",
        }
        size = len(json.dumps(doc, separators=(",", ":")))
        doc["padding"] = "x" * max(0, BODY_BYTES - size)
        body = json.dumps(doc, separators=(",", ":")).encode()
        headers = sign("github", body, secret, now=now, msg_id=delivery)
        headers |= {"content-type": "application/json", "x-github-event": "pull_request"}
        out.append((body, headers))
    return out


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("client", "raw") == "raw":
        return await _load_raw(spec)
    return await _load_aiohttp(spec)


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the raw load generator: one request at a time,
    answers parsed by httptools (the server side's parser)."""

    def __init__(self, gen: _RawLoad) -> None:
        import httptools

        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current: tuple[int, float] | None = None  # (request index, scheduled time)
        self.started = 0.0
        self.body: list[bytes] = []
        self.closed = False
        gen.conns.append(self)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # a malformed answer: the request failed, the connection too
            self.fail(f"bad response: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fail("connection closed")

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        current, self.current = self.current, None
        if current is None:
            return
        status = self.parser.get_status_code()
        body, self.body = b"".join(self.body), []
        keep = self.parser.should_keep_alive()
        self.gen.answered(current, status, body)
        if keep and not self.closed:
            self.gen.idle.append(self)
        else:
            self.close()

    def send(self, index: int, scheduled: float, request: bytes) -> None:
        assert self.transport is not None
        self.current = (index, scheduled)
        self.started = time.perf_counter()
        self.transport.write(request)

    def fail(self, why: str) -> None:
        current, self.current = self.current, None
        if current is not None:
            self.gen.failed(current, why)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _RawLoad:
    """Open-loop load over plain keep-alive connections, without an HTTP client library.

    At 2,000-4,000 req/s aiohttp's client took 70-100% of a core on this 2-core machine, the
    same CPU the server under test needs; this one writes pre-encoded requests and parses
    answers with httptools, on callbacks (no task per request). Same semantics as the aiohttp
    client: connections are reused while idle and opened (up to the in-flight cap) when none
    is; latency counts from the scheduled send time; a request unanswered after
    REQUEST_TIMEOUT_S fails as a timeout.
    """

    def __init__(self, spec: dict[str, Any], requests: list[bytes], n_warm: int) -> None:
        split = urlsplit(spec["url"])
        self.host = split.hostname or "127.0.0.1"
        self.port = split.port or 80
        self.requests = requests
        self.n_warm = n_warm
        self.conns: list[_RawConnection] = []  # every connection opened
        self.idle: list[_RawConnection] = []
        self.inflight = 0
        self.latencies_us: list[int] = []
        self.done_at: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: dict[str, str] = {}
        self.send_lag_us: list[int] = []

    def answered(self, current: tuple[int, float], status: int, body: bytes) -> None:
        self.inflight -= 1
        index, scheduled = current
        if index < self.n_warm:
            return
        now = time.perf_counter()
        if 200 <= status < 300:
            self.latencies_us.append(round((now - scheduled) * 1e6))
            self.done_at.append(now)
            return
        label = f"HTTP {status}"
        if status >= 400:
            label += _problem_type(body)
        self.errors[label] += 1
        self.samples.setdefault(label, body.decode(errors="replace")[:300])

    def failed(self, current: tuple[int, float], why: str) -> None:
        self.inflight -= 1
        if current[0] >= self.n_warm:
            self.errors["connection error/timeout"] += 1
            self.samples.setdefault("connection error/timeout", why)

    def start(self, index: int, scheduled: float) -> asyncio.Task[None] | None:
        """Send on an idle connection; or, when none is, on a new one (a task only then)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                self._send(conn, index, scheduled)
                return None
        return asyncio.get_running_loop().create_task(self._connect_and_send(index, scheduled))

    async def _connect_and_send(self, index: int, scheduled: float) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _RawConnection(self), self.host, self.port
            )
        except OSError as exc:
            self.failed((index, scheduled), repr(exc))
            return
        self._send(conn, index, scheduled)

    def _send(self, conn: _RawConnection, index: int, scheduled: float) -> None:
        if index >= self.n_warm:
            self.send_lag_us.append(round((time.perf_counter() - scheduled) * 1e6))
        conn.send(index, scheduled, self.requests[index])

    def sweep(self) -> None:
        """Fail requests older than REQUEST_TIMEOUT_S (their connection is closed)."""
        limit = time.perf_counter() - REQUEST_TIMEOUT_S
        for conn in [c for c in self.conns if c.current and c.started < limit]:
            conn.fail("timeout")
        self.conns = [c for c in self.conns if not c.closed]


def _plan(spec: dict[str, Any]) -> tuple[float, float, int, int, int]:
    """(rate, duration, in-flight cap, requests in the warm-up, requests in all)."""
    rate: float = spec["rate"]
    duration: float = spec["duration"]
    n_warm = round(rate * spec["warmup"])
    return rate, duration, int(spec["max_inflight"]), n_warm, n_warm + round(rate * duration)


async def _load_raw(spec: dict[str, Any]) -> dict[str, Any]:
    rate, duration, cap, n_warm, n = _plan(spec)
    split = urlsplit(spec["url"])
    head = f"POST {split.path} HTTP/1.1\r\nHost: {split.netloc}\r\n".encode()
    requests = []
    for body, headers in _requests(n, spec["secret"]):
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        requests.append(
            head
            + f"{lines}Accept: */*\r\nUser-Agent: relayport-bench\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    gen = _RawLoad(spec, requests, n_warm)
    pending: set[asyncio.Task[None]] = set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter() + 0.05
    window_start = t0 + n_warm / rate
    next_sweep = t0 + 0.5
    i = 0
    while i < n:
        now = time.perf_counter()
        due = min(n, int((now - t0) * rate) + 1)
        while i < due:
            scheduled = t0 + i / rate
            if gen.inflight >= cap:
                if i >= n_warm:
                    gen.errors["in-flight cap"] += 1
            else:
                gen.inflight += 1
                task = gen.start(i, scheduled)
                if task is not None:
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            i += 1
        if now >= next_sweep:
            gen.sweep()
            next_sweep = now + 0.5
        if i < n:
            # At least 1 ms: uvloop's timers have millisecond resolution, and shorter sleeps
            # spun (measured: 62% of a core at 2,000 req/s against 12% with asyncio's loop).
            # What falls due meanwhile goes out together; latency still counts from the
            # scheduled time.
            await asyncio.sleep(max(0.001, t0 + i / rate - time.perf_counter()))
    window_end = t0 + n / rate
    deadline = window_end + DRAIN_S
    while gen.inflight > 0 and time.perf_counter() < deadline:
        gen.sweep()
        await asyncio.sleep(0.01)
    if gen.inflight > 0:
        gen.errors["unanswered after drain"] += gen.inflight
    for conn in gen.conns:
        conn.current = None
        conn.close()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    after = resource.getrusage(resource.RUSAGE_SELF)
    last = max(gen.done_at, default=window_end)
    return {
        "measured": n - n_warm,
        "window_s": max(duration, last - window_start),
        "latencies_us": gen.latencies_us,
        "send_lag_p99_us": _percentile(sorted(gen.send_lag_us), 0.99) if gen.send_lag_us else 0,
        "errors": dict(gen.errors),
        "samples": gen.samples,
        "client_cpu_s": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
        "wall_s": time.perf_counter() - t0,
    }


async def _load_aiohttp(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    rate, duration, cap, n_warm, n = _plan(spec)
    reqs = _requests(n, spec["secret"])
    latencies_us: list[int] = []
    done_at: list[float] = []
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    inflight = 0
    send_lag_us: list[int] = []

    connector = aiohttp.TCPConnector(limit=cap, limit_per_host=cap, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:

        async def send(i: int, scheduled: float) -> None:
            nonlocal inflight
            body, headers = reqs[i]
            measured = i >= n_warm
            if measured:
                send_lag_us.append(round((time.perf_counter() - scheduled) * 1e6))
            try:
                async with session.post(spec["url"], data=body, headers=headers) as response:
                    text = await response.read()
                    status: int | None = response.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                status, text = None, repr(exc).encode()
            finally:
                inflight -= 1
            now = time.perf_counter()
            if not measured:
                return
            if status is not None and 200 <= status < 300:
                latencies_us.append(round((now - scheduled) * 1e6))
                done_at.append(now)
            else:
                label = f"HTTP {status}" if status is not None else "connection error/timeout"
                if status is not None and status >= 400:
                    label += _problem_type(text)  # 503 overloaded and ingest-unavailable apart
                errors[label] += 1
                samples.setdefault(label, text.decode(errors="replace")[:300])

        tasks: set[asyncio.Task[None]] = set()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter() + 0.05
        window_start = t0 + n_warm / rate
        i = 0
        while i < n:
            now = time.perf_counter()
            due = min(n, int((now - t0) * rate) + 1)
            while i < due:
                scheduled = t0 + i / rate
                if inflight >= cap:
                    if i >= n_warm:
                        errors["in-flight cap"] += 1
                else:
                    inflight += 1
                    task = asyncio.create_task(send(i, scheduled))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        window_end = t0 + n / rate
        if tasks:
            _, pending = await asyncio.wait(
                set(tasks), timeout=max(0.1, window_end + DRAIN_S - time.perf_counter())
            )
            for task in pending:
                task.cancel()
            if pending:
                errors["unanswered after drain"] += len(pending)
                await asyncio.gather(*pending, return_exceptions=True)
        after = resource.getrusage(resource.RUSAGE_SELF)
    last = max(done_at, default=window_end)
    return {
        "measured": n - n_warm,
        "window_s": max(duration, last - window_start),
        "latencies_us": latencies_us,
        "send_lag_p99_us": _percentile(sorted(send_lag_us), 0.99) if send_lag_us else 0,
        "errors": dict(errors),
        "samples": samples,
        "client_cpu_s": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
        "wall_s": time.perf_counter() - t0,
    }


def _problem_type(body: bytes) -> str:
    try:
        kind = json.loads(body).get("type")
    except (ValueError, AttributeError):
        return ""
    return f" {kind}" if isinstance(kind, str) else ""


def loadgen_main(spec_json: str) -> None:
    import uvloop

    spec = json.loads(spec_json)
    result = uvloop.run(_load(spec))
    # To a file, not stdout: a result larger than a pipe's buffer was cut off at 128 KiB (the
    # event loop may leave stdout non-blocking).
    Path(spec["result_path"]).write_text(json.dumps(result))


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Row:
    profile: str
    target: str
    rate: float
    measured: int = 0
    window_s: float = 0.0
    latencies_us: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    server_cpu: float | None = None  # the server process (the API for relayport)
    worker_cpu: float | None = None  # postgres: the `relayport worker` process
    client_cpu: float = 0.0
    other_cpu: float | None = None
    send_lag_p99_ms: float = 0.0
    # PostgreSQL: jobs not yet succeeded once the worker had `settle()`'s time after the rate.
    jobs_behind: int | None = None
    # PostgreSQL: deliveries per intake transaction (jobs created / outbox messages) at this rate.
    batch_rows: float | None = None

    @property
    def accepted_rps(self) -> float:
        return len(self.latencies_us) / self.window_s if self.window_s else 0.0

    def pct_ms(self, q: float) -> float | None:
        ordered = sorted(self.latencies_us)
        return _percentile(ordered, q) / 1000 if ordered else None

    @property
    def error_rate(self) -> float:
        return sum(self.errors.values()) / self.measured if self.measured else 0.0


async def measure(
    row: Row, url: str, procs: list[int], secret: str, args: Any
) -> Row:  # one rate on one target
    spec = {
        "url": url,
        "rate": row.rate,
        "warmup": args.warmup,
        "duration": args.duration,
        "max_inflight": args.max_inflight,
        "client": args.client,
        "secret": secret,
    }
    fd, result_path = tempfile.mkstemp(prefix="relayport-bench-ingest-", suffix=".json")
    os.close(fd)
    spec["result_path"] = result_path
    cpu0 = [cpu_seconds(p) for p in procs]
    ticks0 = machine_ticks()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.ingest", "_loadgen", json.dumps(spec),
        cwd=ROOT,
    )  # fmt: skip
    spies: list[asyncio.subprocess.Process] = []
    try:
        if args.py_spy is not None and row.target == "relayport":
            spies = await _start_py_spy(row, procs, args)
        await asyncio.wait_for(child.wait(), args.warmup + args.duration + 120)
        if child.returncode != 0:
            raise BenchError(f"load generator exited with {child.returncode}")
        part = json.loads(Path(result_path).read_text())  # noqa: ASYNC240 (the window is over)
    finally:
        Path(result_path).unlink(missing_ok=True)  # noqa: ASYNC240
        if child.returncode is None:
            child.kill()
            await child.wait()
        for spy in spies:
            await _stop_py_spy(spy)
    cpu1 = [cpu_seconds(p) for p in procs]
    ticks1 = machine_ticks()
    wall = part["wall_s"]
    row.measured = part["measured"]
    row.window_s = part["window_s"]
    row.latencies_us = part["latencies_us"]
    row.errors = part["errors"]
    row.samples = part["samples"]
    row.client_cpu = part["client_cpu_s"] / wall
    row.send_lag_p99_ms = part["send_lag_p99_us"] / 1000
    if all(c is not None for c in cpu0 + cpu1):
        used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]  # type: ignore[operator]
        server_s = sum(used)
        row.server_cpu = used[0] / wall
        if len(used) > 1:
            row.worker_cpu = sum(used[1:]) / wall
        if ticks0 is not None and ticks1 is not None:
            busy = (ticks1[0] - ticks0[0]) / os.sysconf("SC_CLK_TCK")
            row.other_cpu = max(0.0, busy - server_s - part["client_cpu_s"]) / wall
    return row


async def _start_py_spy(row: Row, procs: list[int], args: Any) -> list[asyncio.subprocess.Process]:
    """py-spy on the server (and worker) during the measured window, one raw (collapsed stacks)
    file per process: DIR/<profile>-<rate>-api.txt and -worker.txt."""
    await asyncio.sleep(args.warmup + 0.3)
    out_dir = Path(args.py_spy)
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before the window)
    spies = []
    for index, pid in enumerate(procs):
        name = "api" if index == 0 else f"worker{index}"
        path = out_dir / f"{row.profile}-{row.rate:.0f}-{name}.txt"
        spy = await asyncio.create_subprocess_exec(
            _py_spy_binary(), "record", "--pid", str(pid), "--rate", "100",
            "--duration", str(max(1, int(args.duration) - 1)), "--format", "raw",
            "--gil", "--output", str(path), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        spies.append(spy)
    return spies


async def settle(procs: list[int], max_s: float = 8.0) -> float:
    """Wait until the server (and worker) are nearly idle: a backlog of jobs left by one rate
    would otherwise eat into the next. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        before = [cpu_seconds(p) or 0.0 for p in procs]
        await asyncio.sleep(0.5)
        used = sum((cpu_seconds(p) or 0.0) - b for p, b in zip(procs, before, strict=True))
        if used < 0.1:
            break
    return time.monotonic() - started


def _progress(row: Row) -> None:
    p99 = row.pct_ms(0.99)
    print(
        f"    {row.rate:>6.0f} req/s offered: {row.accepted_rps:>7.0f} accepted/s, "
        f"p99 {'n/a' if p99 is None else f'{p99:.1f} ms'}, errors {row.error_rate * 100:.1f}%",
        flush=True,
    )


# --- RabbitMQ vhost ---------------------------------------------------------------------------


def _rabbitmqctl(*argv: str) -> None:
    try:
        done = subprocess.run(
            ["rabbitmqctl", *argv], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"rabbitmqctl {argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(argv)}: {done.stderr.strip()[-400:]}")


@contextlib.contextmanager
def rabbit_vhost(amqp_url: str) -> Any:
    name = f"rp-bench-{secrets.token_hex(6)}"
    user = urlsplit(amqp_url).username or "guest"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield f"{amqp_url.rstrip('/')}/{name}"
    finally:
        _rabbitmqctl("delete_vhost", name)


@contextlib.asynccontextmanager
async def profile_env(profile: str, args: Any, data_dir: Path) -> AsyncIterator[dict[str, str]]:
    async with backing(profile, args, data_dir) as env:
        env = env | INGEST_LIMITS | {f"RELAYPORT_INGEST__{k.upper()}": v for k, v in args.ingest}
        if profile == "embedded":
            yield env
            return
        with rabbit_vhost(args.amqp_url) as url:
            env["RELAYPORT_BROKER_URL"] = url
            yield env


async def create_source(base: str, key: str, secret: str) -> str:
    import aiohttp

    from relayport.ingest.signatures import sign

    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        spec = {"name": "bench", "scheme": "github", "secrets": [secret]}
        async with session.post(base + "/v1/sources", json=spec, headers=auth) as response:
            if response.status != 201:
                raise BenchError(
                    f"source creation answered {response.status}: {await response.text()}"
                )
            source_id = str((await response.json())["id"])
        body = b'{"zen":"bench check"}'
        headers = sign("github", body, secret, now=time.time(), msg_id=secrets.token_hex(8))
        headers |= {"content-type": "application/json", "x-github-event": "ping"}
        async with session.post(f"{base}/v1/ingest/{source_id}", data=body, headers=headers) as r:
            if r.status != 202:
                raise BenchError(f"check delivery answered {r.status}: {await r.text()}")
    return source_id


# --- reporting --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def report(rows: list[Row], args: Any) -> list[str]:
    lines = [
        f"open loop; per rate {args.warmup:g} s warm-up (not counted) + {args.duration:g} s "
        f"measured; in-flight cap {args.max_inflight}; ~{BODY_BYTES} B GitHub-signed bodies, "
        "unique deliveries.",
        "latency from the scheduled send time; accepted/s counts 2xx; CPU in % of one core "
        "(server = the server process; worker = the postgres profile's worker process; other = "
        "rest of the machine, incl. PostgreSQL/RabbitMQ/Redis).",
        "",
        "| profile | target | offered req/s | accepted/s (2xx) | p50 ms | p99 ms | error rate "
        "| server CPU | worker CPU | client CPU | other CPU | send lag p99 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.profile} | {r.target} | {r.rate:.0f} | {r.accepted_rps:.0f} | "
            f"{_ms(r.pct_ms(0.50))} | {_ms(r.pct_ms(0.99))} | {r.error_rate * 100:.1f}% | "
            f"{_pct(r.server_cpu)} | {'-' if r.worker_cpu is None else _pct(r.worker_cpu)} | "
            f"{_pct(r.client_cpu)} | {_pct(r.other_cpu)} | "
            f"{r.send_lag_p99_ms:.1f} |"
        )
    base = {(r.target, r.rate): r for r in rows if r.profile == "-"}
    rp = [r for r in rows if r.target == "relayport"]
    if rp:
        lines += [
            "",
            "| profile | offered req/s | relayport/bare | relayport/verify (no durability) |",
            "|---|--:|--:|--:|",
        ]
        for r in rp:
            bare, ver = base.get(("bare", r.rate)), base.get(("verify", r.rate))
            ratios = [
                f"{r.accepted_rps / b.accepted_rps * 100:.0f}%" if b and b.accepted_rps else "n/a"
                for b in (bare, ver)
            ]
            lines.append(f"| {r.profile} | {r.rate:.0f} | {ratios[0]} | {ratios[1]} |")
    pg = [r for r in rp if r.profile == "postgres"]
    verify_rows = [r for r in rows if r.target == "verify"]
    if pg:
        best = max(pg, key=lambda r: r.accepted_rps)
        at = next((r for r in pg if r.rate == GOAL_P99_RATE), None)
        best_verify = max((r.accepted_rps for r in verify_rows), default=0.0)
        p99 = at.pct_ms(0.99) if at else None
        ratio = best.accepted_rps / best_verify if best_verify else None
        lines += [
            "",
            "Goal check (issue 3, PostgreSQL + RabbitMQ):",
            f"- >= {GOAL_RPS} accepted/s durable: best {best.accepted_rps:.0f}/s at "
            f"{best.rate:.0f} offered ({best.error_rate * 100:.1f}% errors): "
            f"{'met' if best.accepted_rps >= GOAL_RPS else 'MISSED'}",
            f"- p99 <= {GOAL_P99_MS:g} ms at {GOAL_P99_RATE} req/s offered: "
            + (
                "not measured"
                if at is None
                else f"{_ms(p99)} ms ({at.error_rate * 100:.1f}% errors): "
                + ("met" if p99 is not None and p99 <= GOAL_P99_MS and not at.errors else "MISSED")
            ),
            f"- >= {GOAL_RATIO * 100:.0f}% of the no-durability endpoint (best vs best, "
            f"{best_verify:.0f}/s): "
            + ("n/a" if ratio is None else f"{ratio * 100:.0f}%: ")
            + ("" if ratio is None else ("met" if ratio >= GOAL_RATIO else "MISSED")),
        ]
    behind = [r for r in rows if r.jobs_behind is not None]
    if behind:
        lines += [
            "",
            "Worker: jobs not yet succeeded after each rate plus the settle wait (up to 8 s): "
            + ", ".join(f"{r.rate:.0f}/s: {r.jobs_behind}" for r in behind),
            "Deliveries per intake transaction (new jobs / outbox messages): "
            + ", ".join(
                f"{r.rate:.0f}/s: {'n/a' if r.batch_rows is None else f'{r.batch_rows:.1f}'}"
                for r in behind
            ),
        ]
    for r in rows:
        if r.errors:
            lines.append(f"\n! {r.profile} {r.target} @ {r.rate:.0f}: errors {r.errors}")
            for kind, body in r.samples.items():
                lines.append(f"    {kind}: {body[:200]}")
    return lines


# --- main -------------------------------------------------------------------------------------


async def run_target(
    profile: str,
    target: str,
    url: str,
    procs: list[int],
    secret: str,
    args: Any,
    jobs_behind: Callable[[], Awaitable[tuple[int, int, int]]] | None = None,
) -> list[Row]:
    rows: list[Row] = []
    counted = (0, 0)  # jobs and ingest outbox messages so far
    if jobs_behind is not None:
        counted = (await jobs_behind())[1:]
    print(f"  [{profile}] {target}: POST {url}", flush=True)
    for rate in args.rates:
        row = await measure(Row(profile, target, rate), url, procs, secret, args)
        _progress(row)
        rows.append(row)
        if target == "relayport":
            waited = await settle(procs)
            if waited > 1:
                print(f"    (waited {waited:.1f} s for the backlog to settle)", flush=True)
            if jobs_behind is not None:
                row.jobs_behind, jobs, messages = await jobs_behind()
                if messages > counted[1]:
                    row.batch_rows = (jobs - counted[0]) / (messages - counted[1])
                counted = (jobs, messages)
                print(
                    f"    jobs not yet succeeded after that: {row.jobs_behind}; deliveries per "
                    f"intake transaction: {row.batch_rows or 0:.1f}",
                    flush=True,
                )
    return rows


def pending_jobs(database_url: str) -> Callable[[], Awaitable[tuple[int, int, int]]]:
    """Counts the jobs the worker has not finished yet (did it keep up with intake?), all jobs,
    and the ingest outbox messages (one per intake transaction and tenant)."""

    async def count() -> tuple[int, int, int]:
        import asyncpg

        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM ingest_jobs WHERE status <> 'succeeded'),"
                " (SELECT count(*) FROM ingest_jobs),"
                " (SELECT count(*) FROM outbox WHERE topic = 'ingest.jobs')"
            )
        finally:
            await conn.close()
        return int(row[0]), int(row[1]), int(row[2])

    return count


async def main_async(args: Any) -> int:
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    if not profiles or any(p not in PROFILES for p in profiles):
        raise BenchError(f"unknown profile(s) in {args.profiles!r}; choose from {PROFILES}")
    print("Inbound webhook ingest: open-loop load, Relayport vs bare Starlette vs verify-only")
    for line in machine_info():
        print(f"  {line}")
    secret = secrets.token_hex(20)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="relayport-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        env = _clean_env({SECRET_ENV: secret})
        baselines = () if args.no_baselines else (("bare", "bare_app"), ("verify", "verify_app"))
        for target, factory in baselines:
            server = start(f"bench.ingest:{factory}", env, tmp / f"{target}.log")
            try:
                await wait_ready_post(server)
                rows += await run_target(
                    "-", target, server.base + "/hook", [server.proc.pid], secret, args
                )
            finally:
                stop_server(server)
            report_server_log(target, server)
        for profile in profiles:
            async with profile_env(profile, args, tmp / f"{profile}-data") as penv:
                app = start(
                    "bench.http_overhead:relayport_app", _clean_env(penv), tmp / f"{profile}.log"
                )
                worker: subprocess.Popen[bytes] | None = None
                try:
                    await wait_ready(app, "/healthz")
                    procs = [app.proc.pid]
                    if profile == "postgres" and not args.no_worker:
                        with (tmp / "worker.log").open("wb") as log:
                            # At a lower priority: on a shared machine the API's answers should
                            # not wait behind job bookkeeping, which catches up in the gaps.
                            nice = ["nice", "-n", str(args.worker_nice)] if args.worker_nice else []
                            worker = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
                                [*nice, sys.executable, "-m", "relayport", "worker"],
                                cwd=ROOT, env=_clean_env(penv), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                            )  # fmt: skip
                        procs.append(worker.pid)
                    key = await make_api_key(app.base)
                    source_id = await create_source(app.base, key, secret)
                    url = f"{app.base}/v1/ingest/{source_id}"
                    behind = None
                    if worker is not None:
                        behind = pending_jobs(penv["RELAYPORT_DATABASE_URL"])
                    rows += await run_target(profile, "relayport", url, procs, secret, args, behind)
                finally:
                    if worker is not None:
                        worker.terminate()
                        try:
                            worker.wait(timeout=20)
                        except subprocess.TimeoutExpired:
                            worker.kill()
                            worker.wait()
                    stop_server(app)
                report_server_log(f"{profile}/relayport", app)
                if worker is not None:
                    report_server_log(f"{profile}/worker", Server(worker, "", tmp / "worker.log"))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("\n".join(report(rows, args)))
    return 0


async def wait_ready_post(server: Server, timeout_s: float = 60) -> None:
    """The baselines have no GET route: any HTTP answer on /hook means the server is up."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise BenchError(f"server exited with {server.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(server.base + "/hook"):
                    return
            await asyncio.sleep(0.1)
    raise BenchError(f"server not ready after {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_loadgen"]:
        loadgen_main(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--rates",
        default="500,1000,2000,3000,4000,5000,6000",
        help="offered req/s, comma-separated",
    )
    parser.add_argument("--duration", type=float, default=8, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=1, help="uncounted seconds per rate")
    parser.add_argument("--profiles", default="embedded,postgres", help="comma-separated")
    parser.add_argument("--max-inflight", type=int, default=2000)
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip bare/verify (profiling runs only)"
    )
    parser.add_argument("--no-worker", action="store_true", help="postgres: no worker process")
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=10,
        help="postgres: the worker process's nice value (0: same priority as the API)",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="load generator's HTTP client: raw keep-alive connections (default; cheapest) or "
        "aiohttp (what runs 1-5 used)",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        default=None,
        help="sample Relayport's server and worker with py-spy (100 Hz) during each window",
    )
    parser.add_argument(
        "--ingest",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="an ingest setting for Relayport (RELAYPORT_INGEST__NAME), e.g. batch_max_wait_ms=5",
    )
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        parser.error("--rates takes comma-separated numbers")
    if not args.rates or min(args.rates) <= 0 or args.duration <= 0 or args.warmup < 0:
        parser.error("need rates > 0, --duration > 0, --warmup >= 0")
    try:
        args.ingest = [tuple(item.split("=", 1)) for item in args.ingest]
    except ValueError:
        parser.error("--ingest takes NAME=VALUE")
    if any(len(item) != 2 for item in args.ingest):
        parser.error("--ingest takes NAME=VALUE")
    if args.max_inflight < 1:
        parser.error("--max-inflight must be >= 1")
    try:
        return asyncio.run(main_async(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
