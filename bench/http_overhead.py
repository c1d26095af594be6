"""What the Relayport middleware and auth path cost per request, against a bare FastAPI app.

    .venv/bin/python -m bench.http_overhead [--duration 15] [--rounds 3] [--warmup 5]
        [--concurrency 32] [--profiles embedded,postgres] [--py-spy DIR]
        [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/0]

About 2.5 minutes with the defaults. Results and how to read them: docs/benchmarks.md.

Three cases, each served by a real uvicorn process this script starts on 127.0.0.1 (one
worker, uvloop + httptools, access log off, log level warning) and stops at the end:

  (a) bare      GET /bare on a FastAPI app with one route and no middleware: the baseline;
  (b) ping      GET /v1/ping on `relayport.app:create_app`: the whole middleware stack, an API
                key (`Bearer rp_…`), rate limiting on with limits too high to ever refuse;
  (c) api-keys  GET /v1/api-keys on the same app and key: the same plus a database read.

Two profiles: `embedded` (SQLite file in a temp dir, everything in-process) and `postgres` (a
fresh database `relayport_bench_<hex>` on 127.0.0.1:5432, dropped at the end; Redis on
127.0.0.1:6379 under a unique key prefix, removed at the end; the broker stays in-process).
One bare server serves the whole run; each profile measures it between its own cases.

The load comes from a separate process (the machine this was written for has 2 cores: a client
in the server's event loop would share its CPU slice), closed loop: N aiohttp connections, each
sending its next request when the last answer arrived. Each case gets `--duration` seconds of
measurement in `--rounds` slices, interleaved a, b, c, a, b, c, … so that a slow minute of a
shared VM hits every case alike; each slice is a fresh load-generator process that warms up
first (`--warmup` seconds in round 1, 1 s after). req/s counts 200 answers only; anything
else is an error and is printed. Server and client CPU use are printed too: a client near 100%
of a core means that case's req/s may be partly the client's limit; the "other" column (the
rest of the machine, PostgreSQL and Redis included) and steal time say how quiet it was.

Goals (from the issue): (b) ≥ 50% and (c) ≥ 25% of (a) in requests/s.

`--py-spy DIR` samples the server with py-spy (GIL holder only, 200 Hz) during (b) and (c),
writes the raw stacks to DIR and prints the hottest frames; sampling slows the server, so take
the numbers from a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("embedded", "postgres")
GOALS = {"ping": 0.50, "api-keys": 0.25}
# High enough never to refuse, but rate limiting stays on: every bucket and quota is checked.
RATELIMIT: dict[str, Any] = {
    "enabled": True,
    "ip_requests_per_second": 1e9,
    "ip_burst": 10**9,
    "principal_requests_per_second": 1e9,
    "principal_burst": 10**9,
    "plans": {"free": {"requests_per_second": 1e9, "burst": 10**9, "daily_quota": 10**12}},
}
SAMPLE_BODY_CHARS = 300


class BenchError(Exception):
    """A set-up step failed; the message says which and why."""


# --- the two ASGI apps (uvicorn --factory targets, run inside the server processes) -----------


def bare_app() -> Any:
    """(a): one route, no middleware, a small JSON body like /v1/ping's."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/bare")
    async def bare() -> dict[str, str]:
        return {"status": "ok", "principal": "none", "tenant_id": "none"}

    return app


def relayport_app() -> Any:
    """(b), (c): the real app, with settings from the RELAYPORT_* variables this script set."""
    from relayport.app import create_app
    from relayport.core.telemetry import configure_logging
    from relayport.settings import Settings

    settings = Settings(_env_file=None)
    configure_logging(settings.telemetry)
    return create_app(settings)


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    log_path: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # A developer's own RELAYPORT_* settings must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    env.update(extra or {})
    return env


def start_server(factory: str, env: dict[str, str], log_path: Path) -> Server:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", "--factory", f"bench.http_overhead:{factory}",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning", "--no-server-header", "--no-proxy-headers",
        "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_ready(server: Server, path: str, timeout_s: float = 60) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if server.proc.poll() is not None:
                raise BenchError(
                    f"server exited with {server.proc.returncode} before it was ready:\n"
                    + _log_tail(server.log_path)
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(server.base + path) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                tail = _log_tail(server.log_path)
                raise BenchError(f"server not ready after {timeout_s}s:\n{tail}")
            await asyncio.sleep(0.1)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def report_server_log(label: str, server: Server) -> None:
    """Anything a server printed at warning level or above is worth seeing."""
    text = server.log_path.read_text(errors="replace").strip()
    if text:
        lines = text.splitlines()
        print(f"  ! {label}: server printed {len(lines)} line(s); the last ones:")
        for line in lines[-8:]:
            print(f"      {line[:240]}")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int, int] | None:
    """(busy, steal, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: guest time is already inside user.
    ticks = [int(v) for v in first[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], ticks[7], sum(ticks)


# --- set-up over HTTP and the backing services ------------------------------------------------


async def make_api_key(base: str) -> str:
    """Sign up, make an admin API key with the access token, and check both cases answer 200."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        signup = {
            "email": f"bench-{secrets.token_hex(4)}@example.com",
            "password": "a long bench passphrase",
            "tenant_name": "Bench",
        }
        async with session.post(base + "/v1/auth/signup", json=signup) as response:
            if response.status != 201:
                raise BenchError(f"signup answered {response.status}: {await response.text()}")
            token = (await response.json())["access_token"]
        async with session.post(
            base + "/v1/api-keys",
            json={"name": "bench", "role": "admin"},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            if response.status != 201:
                detail = await response.text()
                raise BenchError(f"key creation answered {response.status}: {detail}")
            key = str((await response.json())["key"])
        for path in ("/v1/ping", "/v1/api-keys"):
            async with session.get(base + path, headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status != 200:
                    detail = await r.text()
                    raise BenchError(f"GET {path} with the key answered {r.status}: {detail}")
    return key


@contextlib.asynccontextmanager
async def postgres_database(admin_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this run; dropped WITH (FORCE) at the end."""
    import asyncpg

    from relayport.core import migrate
    from relayport.core.db import Database

    name = f"relayport_bench_{secrets.token_hex(6)}"

    async def admin(sql: str) -> None:
        try:
            conn = await asyncpg.connect(admin_url, timeout=10)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise BenchError(f"PostgreSQL at {admin_url} is unreachable: {exc}") from exc
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"')
    try:
        parts = urlsplit(admin_url)
        url = urlunsplit(("postgresql", parts.netloc, f"/{name}", parts.query, ""))
        db = Database(url.replace("postgresql://", "postgresql+asyncpg://", 1))
        try:
            await migrate.upgrade(db)
        finally:
            await db.dispose()
        yield url
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def redis_prefix(url: str) -> AsyncIterator[str]:
    """A key prefix of our own on a reachable Redis; its keys are deleted at the end."""
    import redis.asyncio

    prefix = f"rp-bench-{secrets.token_hex(6)}:"
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=5)
    try:
        try:
            await client.ping()
        except (redis.RedisError, OSError) as exc:
            raise BenchError(f"Redis at {url} is unreachable: {exc}") from exc
        yield prefix
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# --- load generator (runs in its own process) -------------------------------------------------


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url: str = spec["url"]
    headers: dict[str, str] = spec["headers"]
    concurrency: int = spec["concurrency"]
    latencies_us: list[int] = []
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    recording = False

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:

        async def worker(end: float) -> None:
            while (started := time.perf_counter()) < end:
                try:
                    async with session.get(url, headers=headers) as response:
                        body = await response.read()
                        status = response.status
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    status, body = None, repr(exc).encode()
                elapsed = time.perf_counter() - started
                if not recording:
                    continue
                if status == 200:
                    latencies_us.append(round(elapsed * 1e6))
                else:
                    label = f"HTTP {status}" if status is not None else "connection error"
                    errors[label] += 1
                    samples.setdefault(label, body.decode(errors="replace")[:SAMPLE_BODY_CHARS])

        end = time.perf_counter() + spec["warmup"]
        await asyncio.gather(*(worker(end) for _ in range(concurrency)))
        recording = True
        print("start", flush=True)  # the parent starts its server CPU clock (and py-spy) here
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        end = started + spec["duration"]
        await asyncio.gather(*(worker(end) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "elapsed_s": elapsed,
        "latencies_us": latencies_us,
        "errors": dict(errors),
        "samples": samples,
        "client_cpu_s": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
    }


def loadgen_main(spec_json: str) -> None:
    import uvloop

    result = uvloop.run(_load(json.loads(spec_json)))
    # uvloop may leave stdout non-blocking; a result larger than the pipe's buffer would then
    # be cut short where the pipe filled up.
    os.set_blocking(sys.stdout.fileno(), True)
    print(json.dumps(result), flush=True)


# --- measuring --------------------------------------------------------------------------------

CASES = {"bare": "(a) bare", "ping": "(b) ping", "api-keys": "(c) api-keys"}
REWARM_S = 1.0  # warm-up of the later rounds: the server is warm, the connections are new


def _percentile(ordered: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Tally:
    """One case of one profile, summed over its rounds."""

    profile: str
    case: str
    elapsed_s: float = 0.0
    latencies_us: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    round_rps: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = 0.0
    wall_s: float = 0.0
    # Whole-machine (busy, steal, total) ticks: what else ran, and what the hypervisor took.
    ticks: list[int] | None = field(default_factory=lambda: [0, 0, 0])

    def add(self, part: dict[str, Any]) -> None:
        self.elapsed_s += part["elapsed_s"]
        self.latencies_us += part["latencies_us"]
        self.errors.update(part["errors"])
        for kind, body in part["samples"].items():
            self.samples.setdefault(kind, body)
        self.round_rps.append(len(part["latencies_us"]) / part["elapsed_s"])
        self.client_cpu_s += part["client_cpu_s"]
        self.wall_s += part["wall_s"]
        if self.server_cpu_s is not None:
            cpu = part["server_cpu_s"]
            self.server_cpu_s = None if cpu is None else self.server_cpu_s + cpu
        if self.ticks is not None:
            ticks = part["ticks"]
            self.ticks = (
                None if ticks is None else [a + b for a, b in zip(self.ticks, ticks, strict=True)]
            )

    @property
    def rps(self) -> float:
        return len(self.latencies_us) / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return _percentile(sorted(self.latencies_us), q) / 1000 if self.latencies_us else math.nan

    @property
    def server_cpu(self) -> float | None:
        return None if self.server_cpu_s is None else self.server_cpu_s / self.wall_s

    @property
    def client_cpu(self) -> float:
        return self.client_cpu_s / self.elapsed_s

    @property
    def other_cpu(self) -> float | None:
        if self.ticks is None or self.server_cpu is None:
            return None
        busy_cores = self.ticks[0] / os.sysconf("SC_CLK_TCK") / self.wall_s
        return max(0.0, busy_cores - self.server_cpu - self.client_cpu)

    @property
    def steal(self) -> float | None:
        return None if self.ticks is None or not self.ticks[2] else self.ticks[1] / self.ticks[2]


def _py_spy_binary() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise BenchError("--py-spy needs py-spy: .venv/bin/pip install py-spy")
    return found


async def _stop_py_spy(spy: asyncio.subprocess.Process) -> None:
    try:
        _, err = await asyncio.wait_for(spy.communicate(), 30)
    except TimeoutError:
        spy.kill()
        _, err = await spy.communicate()
    if spy.returncode != 0:
        print(f"  ! py-spy failed: {err.decode(errors='replace').strip()[-400:]}")


async def measure(
    server: Server,
    path: str,
    headers: dict[str, str],
    *,
    concurrency: int,
    warmup: float,
    duration: float,
    spy_out: Path | None,
) -> dict[str, Any]:
    """One slice of load from a fresh load-generator process, with the server's CPU use."""
    spec = {
        "url": server.base + path,
        "headers": headers,
        "concurrency": concurrency,
        "warmup": warmup,
        "duration": duration,
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.http_overhead", "_loadgen", json.dumps(spec),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, limit=2**26,
    )  # fmt: skip
    assert child.stdout is not None
    spy: asyncio.subprocess.Process | None = None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), warmup + 60)
        if line.strip() != b"start":
            raise BenchError(f"load generator failed during warm-up (said {line!r})")
        cpu_before, wall_before = cpu_seconds(server.proc.pid), time.perf_counter()
        ticks_before = machine_ticks()
        if spy_out is not None:
            spy = await asyncio.create_subprocess_exec(
                _py_spy_binary(), "record", "--pid", str(server.proc.pid), "--rate", "200",
                "--duration", str(max(1, int(duration) - 1)), "--format", "raw",
                # --gil: only the thread holding the GIL. Without it, aiosqlite's worker threads
                # blocked in SimpleQueue.get() count as busy and swamp the profile.
                "--gil", "--function", "--output", str(spy_out),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        output = await asyncio.wait_for(child.stdout.read(), duration + 60)
        cpu_after, wall_after = cpu_seconds(server.proc.pid), time.perf_counter()
        ticks_after = machine_ticks()
        if await child.wait() != 0:
            raise BenchError(f"load generator exited with {child.returncode}")
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        if spy is not None:
            await _stop_py_spy(spy)
    last = output.decode().strip().splitlines()[-1] if output.strip() else ""
    try:
        part: dict[str, Any] = json.loads(last)
    except ValueError:
        raise BenchError(
            f"load generator printed no result (last line {len(last)} chars: {last[-300:]!r})"
        ) from None
    part["wall_s"] = wall_after - wall_before
    part["server_cpu_s"] = (
        None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    )
    part["ticks"] = (
        None
        if ticks_before is None or ticks_after is None
        else [a - b for a, b in zip(ticks_after, ticks_before, strict=True)]
    )
    return part


@contextlib.asynccontextmanager
async def backing(profile: str, args: Any, data_dir: Path) -> AsyncIterator[dict[str, str]]:
    """The RELAYPORT_* variables of a profile, with its database and Redis prefix ready."""
    env = {
        "RELAYPORT_ENV": "development",
        "RELAYPORT_DATA_DIR": str(data_dir),
        "RELAYPORT_RATELIMIT": json.dumps(RATELIMIT),
        "RELAYPORT_TELEMETRY__LOG_LEVEL": "WARNING",
        "RELAYPORT_BROKER_URL": "memory",
        # Given rather than generated into the data dir, which would log a warning each start.
        "RELAYPORT_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
        "RELAYPORT_CRYPTO__MASTER_KEYS": json.dumps(
            {"bench": base64.b64encode(secrets.token_bytes(32)).decode()}
        ),
    }
    if profile == "embedded":
        env["RELAYPORT_DATABASE_URL"] = f"sqlite:///{data_dir / 'relayport.db'}"
        env["RELAYPORT_AUTO_MIGRATE"] = "true"
        yield env
        return
    async with postgres_database(args.pg_url) as url, redis_prefix(args.redis_url) as prefix:
        env["RELAYPORT_DATABASE_URL"] = url
        env["RELAYPORT_AUTO_MIGRATE"] = "false"
        env["RELAYPORT_REDIS_URL"] = args.redis_url
        env["RELAYPORT_REDIS_KEY_PREFIX"] = prefix
        yield env


async def run_profile(profile: str, bare: Server, args: Any, tmp: Path) -> list[Tally]:
    """(a), (b) and (c) in turn, `--rounds` times, so a slow minute hits every case alike."""
    tallies = {case: Tally(profile, case) for case in CASES}
    async with backing(profile, args, tmp / f"{profile}-data") as env:
        app = start_server("relayport_app", _clean_env(env), tmp / f"{profile}-relayport.log")
        try:
            await wait_ready(app, "/healthz")
            key = await make_api_key(app.base)
            auth = {"Authorization": f"Bearer {key}"}
            targets = {
                "bare": (bare, "/bare", {}),
                "ping": (app, "/v1/ping", auth),
                "api-keys": (app, "/v1/api-keys", auth),
            }
            for n in range(1, args.rounds + 1):
                for case, (server, path, headers) in targets.items():
                    print(
                        f"[{profile}] round {n}/{args.rounds}: {CASES[case]} GET {path}", flush=True
                    )
                    spy_out = None
                    if args.py_spy is not None and case != "bare":
                        spy_out = Path(args.py_spy) / f"{profile}-{case}-r{n}.txt"
                    part = await measure(
                        server,
                        path,
                        headers,
                        concurrency=args.concurrency,
                        warmup=args.warmup if n == 1 else min(args.warmup, REWARM_S),
                        duration=args.duration / args.rounds,
                        spy_out=spy_out,
                    )
                    tallies[case].add(part)
        finally:
            stop_server(app)
        report_server_log(f"{profile}/relayport", app)
    return list(tallies.values())


# --- reporting --------------------------------------------------------------------------------


def machine_info() -> list[str]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "aiohttp")
    )
    return [
        f"date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"nproc: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        f"cpu: {model}",
        f"python: {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}",
        f"packages: {versions}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def print_report(tallies: list[Tally], args: Any) -> None:
    print(
        f"\nconcurrency {args.concurrency}; per case {args.duration:g} s measured in "
        f"{args.rounds} round(s) of {args.duration / args.rounds:g} s, interleaved a, b, c "
        f"(warm-up {args.warmup:g} s in round 1, {min(args.warmup, REWARM_S):g} s after).\n"
        "req/s counts 200s only. CPU columns in % of one core: the server process, the load "
        "generator,\neverything else on the machine (PostgreSQL and Redis included); steal: "
        "CPU time the hypervisor took.\n"
    )
    head = ("profile", "case", "req/s", "p50 ms", "p99 ms", "errors", "server", "client", "other")
    print(f"{head[0]:<9} {head[1]:<13} {head[2]:>7} {head[3]:>7} {head[4]:>7} {head[5]:>6} "
          f"{head[6]:>6} {head[7]:>6} {head[8]:>6} {'steal':>5}  req/s per round")  # fmt: skip
    for t in tallies:
        rounds = " / ".join(f"{x:.0f}" for x in t.round_rps)
        print(
            f"{t.profile:<9} {CASES[t.case]:<13} {t.rps:>7.0f} {t.percentile_ms(0.50):>7.2f} "
            f"{t.percentile_ms(0.99):>7.2f} {sum(t.errors.values()):>6} {_pct(t.server_cpu):>6} "
            f"{_pct(t.client_cpu):>6} {_pct(t.other_cpu):>6} {_pct(t.steal):>5}  {rounds}"
        )
    print()
    for profile in dict.fromkeys(t.profile for t in tallies):
        by_case = {t.case: t for t in tallies if t.profile == profile}
        base = by_case["bare"]
        for case, goal in GOALS.items():
            if not base.rps:
                continue
            ratio = by_case[case].rps / base.rps
            per_round = [
                x / b for x, b in zip(by_case[case].round_rps, base.round_rps, strict=True) if b
            ]
            verdict = "met" if ratio >= goal else "MISSED"
            print(
                f"{profile}: {CASES[case][:3]}/(a) = {ratio * 100:.1f}% "
                f"(rounds {min(per_round) * 100:.1f} to {max(per_round) * 100:.1f}%; "
                f"goal ≥ {goal * 100:.0f}%: {verdict})"
            )
    for t in tallies:
        if t.errors:
            print(f"\n! {t.profile} {CASES[t.case]}: errors {dict(t.errors)}")
            for kind, body in t.samples.items():
                print(f"    {kind}: {body}")
        if t.client_cpu >= 0.9:
            print(
                f"! {t.profile} {CASES[t.case]}: the load generator used {_pct(t.client_cpu)} "
                "of a core: this req/s may be partly the client's limit"
            )


def _package(frame: str) -> str:
    """`send (uvicorn/protocols/http/httptools_impl.py:463)` -> `uvicorn`."""
    where = frame.rpartition("(")[2]
    return where.split("/", 1)[0] if "/" in where else where.rstrip(")").split(":")[0]


def summarize_py_spy(directory: Path, top: int = 12) -> None:
    """Where the server's GIL-holding thread spent its time (py-spy ran with --gil).

    SQLAlchemy's async layer runs queries in greenlets, which py-spy shows as stacks of their
    own (rooted at `Session.execute` and the like), so those carry no Relayport frame.
    Own time by package and by frame; then every sample charged to the innermost Relayport
    frame on its stack (what Relayport code asked for, library work included); then the
    inclusive share of Relayport frames, where the step from one middleware to the next is
    what the outer one costs.
    """
    groups: dict[str, list[Path]] = {}
    for path in sorted(directory.glob("*-r*.txt")):
        groups.setdefault(path.stem.rpartition("-r")[0], []).append(path)
    for name, paths in groups.items():
        packages: Counter[str] = Counter()
        own: Counter[str] = Counter()
        nearest: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for line in (line for path in paths for line in path.read_text().splitlines()):
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            own[frames[-1]] += count
            packages[_package(frames[-1])] += count
            ours = [f for f in frames if "relayport/" in f]
            nearest[ours[-1] if ours else "(no Relayport frame on the stack)"] += count
            for frame in set(ours):
                inclusive[frame] += count
        if not total:
            continue
        sections = (
            ("own time by package", packages, top),
            ("own time by frame", own, top),
            ("charged to the innermost Relayport frame", nearest, top),
            ("inclusive time of Relayport frames", inclusive, top * 2),
        )
        print(f"\npy-spy {name}: {total} samples holding the GIL")
        for title, counter, limit in sections:
            print(f"  {title}:")
            for frame, count in counter.most_common(limit):
                print(f"    {count / total * 100:5.1f}%  {frame[:140]}")


async def main_async(args: Any) -> int:
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown or not profiles:
        raise BenchError(f"unknown profile(s) {unknown}; choose from {', '.join(PROFILES)}")
    print("HTTP overhead: bare FastAPI vs Relayport's middleware + auth (+ a DB read)")
    for line in machine_info():
        print(f"  {line}")
    load_s = (
        len(profiles)
        * len(CASES)
        * (args.duration + args.warmup + (args.rounds - 1) * min(args.warmup, REWARM_S))
    )
    print(f"  plan: {len(profiles)} profile(s) x 3 cases: about {load_s:.0f} s of load")
    if "postgres" in profiles:
        print(
            f"  postgres profile: PostgreSQL {urlsplit(args.pg_url).netloc}, Redis "
            f"{urlsplit(args.redis_url).netloc} (rate limits and quotas), broker in-process"
        )
    tallies: list[Tally] = []
    with tempfile.TemporaryDirectory(prefix="relayport-bench-") as tmp:
        # One baseline server for the whole run; each profile measures it between its own cases.
        bare = start_server("bare_app", _clean_env(), Path(tmp) / "bare.log")
        try:
            await wait_ready(bare, "/bare")
            for profile in profiles:
                tallies += await run_profile(profile, bare, args, Path(tmp))
        finally:
            stop_server(bare)
        report_server_log("bare", bare)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_report(tallies, args)
    if args.py_spy is not None:
        print("\n(py-spy was sampling the server during (b) and (c): those numbers are lower)")
        summarize_py_spy(Path(args.py_spy))
    return 1 if any(t.errors for t in tallies) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_loadgen"]:
        loadgen_main(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.http_overhead", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--duration", type=float, default=15, help="measured seconds per case")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved slices per case")
    parser.add_argument("--warmup", type=float, default=5, help="warm-up seconds per case")
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--profiles", default="embedded,postgres", help="comma-separated")
    parser.add_argument("--py-spy", metavar="DIR", help="sample the server during (b) and (c)")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.rounds < 1:
        parser.error("need --duration > 0, --warmup >= 0, --concurrency >= 1, --rounds >= 1")
    try:
        if args.py_spy is not None:
            _py_spy_binary()
            Path(args.py_spy).mkdir(parents=True, exist_ok=True)
        return asyncio.run(main_async(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
