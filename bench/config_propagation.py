"""Live configuration propagation: time from a version's commit to every subscriber having it.

    .venv/bin/python -m bench.config_propagation [--sizes 100,1000,10000]
        [--modes ws,sse,ws-redis-2,sse-redis-2,broadcast] [--rounds 5] [--client-procs 4]
        [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--redis-url redis://…]
        [--amqp-url amqp://guest:guest@127.0.0.1:5672] [--py-spy DIR]

Modes, each with real `relayport serve` processes on 127.0.0.1 started and stopped here:

  ws, sse          one process, embedded profile (SQLite, in-process pub/sub), subscribers on
                   WebSocket or Server-Sent Events;
  ws-redis-2,      two processes on PostgreSQL + Redis (a fresh database, dropped at the end),
  sse-redis-2      subscribers split evenly; the write goes to the first;
  ws-workers-2,    one `relayport serve --workers 2` on PostgreSQL + Redis (+ a RabbitMQ vhost,
                   which several processes need, made with rabbitmqctl): the kernel spreads
  sse-workers-2    the connections over the two processes, each receives a change once;
  broadcast        the raw limit: a bare `websockets` server (uvloop) that calls
                   `websockets.broadcast` with one frame, no storage, no pub/sub.

Subscribers run in --client-procs processes of their own (uvloop; each a bare asyncio protocol
speaking just the WebSocket upgrade and frames or SSE, no compression, no task per connection).
For Relayport, latency = receive time - the version's `created_at` (stamped inside the
committing transaction, read back from `GET …/versions`); for `broadcast`, receive time - the
server's clock just before the broadcast call. Same machine, same clock. Each round writes one
key and waits until every subscriber has the new revision (or 20 s). Memory per idle
subscriber = growth of the server processes' RSS from before connecting to after, / N.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.http_overhead import (
    RATELIMIT,
    ROOT,
    BenchError,
    Server,
    _clean_env,
    _free_port,
    machine_info,
    make_api_key,
    postgres_database,
    redis_prefix,
    report_server_log,
    stop_server,
    wait_ready,
)
from bench.ingest import rabbit_vhost

MODES = ("ws", "sse", "ws-redis-2", "sse-redis-2", "ws-workers-2", "sse-workers-2", "broadcast")
ROUND_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 120.0


# --- subscriber processes --------------------------------------------------------------------


class _LeanClient(asyncio.Protocol):
    """One subscriber as a bare protocol: no task, no library, a few hundred bytes of state.

    Speaks just enough: the WebSocket upgrade and unmasked server frames, or an HTTP/1.1 SSE
    response (chunk-size lines pass through the line parser, as they never start with `id:`).
    Kept this lean so that on two shared cores the clients cost little beside the server.
    """

    def __init__(self, request: bytes, ws: bool, opened: Any, record: Any, server: int) -> None:
        self.server = server  # which server of the mode (its index in the URLs)
        self.request = request
        self.ws = ws
        self.opened = opened
        self.record = record
        self.buf = bytearray()
        self.open = False
        self.pending: int | None = None  # SSE: the id of the event being read
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"closed before the handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if (b" 101 " if self.ws else b" 200 ") not in status + b" ":
                self.handshake.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            del buf[: end + 4]
            self.open = True
            self.handshake.set_result(None)
            self.opened()
        if self.ws:
            self._frames()
        else:
            self._lines()

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            size, head = buf[1] & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, head = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, head = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < head + size:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[head : head + size])
            del buf[: head + size]
            if opcode == 1:
                message = json.loads(payload)
                if message.get("type") in ("patch", "broadcast"):
                    self.record(int(message["revision"]), self.server)

    def _lines(self) -> None:
        buf = self.buf
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = buf[start:end]
            start = end + 1
            if line.startswith(b"id: "):
                self.pending = int(line[4:])
            elif not line and self.pending is not None:  # end of an event: dispatch it
                self.record(self.pending, self.server)
                self.pending = None
        del buf[:start]


async def _subscribers(spec: dict[str, Any], pipe: Any) -> None:
    """Open spec["n"] connections, report ready, record (revision, ns) per message until told."""
    seen: dict[int, list[int]] = {}
    servers: dict[int, list[int]] = {}  # the server index of each stamp in `seen`
    target = spec["n"]
    sem = asyncio.Semaphore(200)  # bound concurrent handshakes
    ready = asyncio.Event()
    opened = 0
    loop = asyncio.get_running_loop()
    ws = spec["transport"] == "ws"

    def record(revision: int, server: int) -> None:
        stamps = seen.setdefault(revision, [])
        stamps.append(time.time_ns())
        servers.setdefault(revision, []).append(server)
        if len(stamps) == target:
            pipe.send(("have", revision))

    def count_open() -> None:
        nonlocal opened
        opened += 1
        if opened == target:
            ready.set()

    def request(url: str) -> bytes:
        host, _, rest = url.partition("://")[2].partition("/")
        lines = [f"GET /{rest} HTTP/1.1", f"Host: {host}"]
        if spec["key"]:
            lines.append(f"Authorization: Bearer {spec['key']}")
        if ws:
            key = base64.b64encode(os.urandom(16)).decode()
            lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                      "Sec-WebSocket-Version: 13"]  # fmt: skip
        else:
            lines.append("Accept: text/event-stream")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    transports: list[Any] = []

    async def one(server: int) -> None:
        url = spec["urls"][server]
        host, _, port = url.partition("://")[2].partition("/")[0].partition(":")
        async with sem:
            client = _LeanClient(request(url), ws, count_open, record, server)
            transport, _ = await loop.create_connection(lambda: client, host, int(port))
            transports.append(transport)
            await asyncio.wait_for(client.handshake, 60)

    tasks = [asyncio.ensure_future(one(i % len(spec["urls"]))) for i in range(target)]
    done = asyncio.ensure_future(ready.wait())
    await asyncio.wait([done, *tasks], timeout=CONNECT_TIMEOUT_S)
    failed = [t for t in tasks if t.done() and t.exception() is not None]
    if failed or not ready.is_set():
        pipe.send(("error", repr(failed[0].exception()) if failed else "connect timeout"))
        return
    pipe.send(("ready", target))
    await loop.run_in_executor(None, pipe.recv)  # "stop"
    pipe.send(("stamps", {str(k): list(zip(v, servers[k], strict=True)) for k, v in seen.items()}))
    for transport in transports:
        transport.abort()


def subscriber_main(spec: dict[str, Any], pipe: Any) -> None:
    import uvloop

    uvloop.run(_subscribers(spec, pipe))


# --- the raw broadcast baseline ---------------------------------------------------------------


async def _broadcast_server(port: int) -> None:
    import websockets

    clients: set[Any] = set()

    async def handler(ws: Any) -> None:
        if ws.request.path == "/control":
            async for raw in ws:
                stamp = time.time_ns()
                frame = json.dumps({"type": "broadcast", "revision": int(raw), "t0": stamp})
                websockets.broadcast(clients, frame)
                await ws.send(str(stamp))
            return
        clients.add(ws)
        try:
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    async with websockets.serve(handler, "127.0.0.1", port, compression=None, backlog=4096):
        await asyncio.Future()


def broadcast_main(port: int) -> None:
    import uvloop

    uvloop.run(_broadcast_server(port))


# --- servers and measurement -----------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """RSS of a process and its children (uvicorn workers), from /proc."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def start_relayport(env: dict[str, str], log_path: Path, workers: int = 1) -> Server:
    import subprocess

    port = _free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relayport", "serve", "--port", str(port),
             "--workers", str(workers)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


async def _setup_env(base: str) -> tuple[str, str, str]:
    """An admin key, an environment with one key at revision 1, and a client key for it."""
    import aiohttp

    admin = await make_api_key(base)
    auth = {"Authorization": f"Bearer {admin}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.post(base + "/v1/projects", json={"name": "bench"}) as r:
            pid = (await r.json())["id"]
        async with http.post(f"{base}/v1/projects/{pid}/environments", json={"name": "prod"}) as r:
            env_path = f"/v1/projects/{pid}/environments/{(await r.json())['id']}"
        async with http.put(f"{base}{env_path}/configs/flag", json={"value": 0}) as r:
            if r.status != 200:
                raise BenchError(f"PUT answered {r.status}: {await r.text()}")
        async with http.post(f"{base}{env_path}/client-keys", json={"name": "bench"}) as r:
            key = (await r.json())["key"]
    return admin, env_path, key


async def _created_at(base: str, admin: str, env_path: str) -> dict[int, int]:
    import aiohttp

    headers = {"Authorization": f"Bearer {admin}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"{base}{env_path}/versions", params={"limit": 200}) as r,
    ):
        data = (await r.json())["data"]
    return {
        v["revision"]: int(dt.datetime.fromisoformat(v["created_at"]).timestamp() * 1e9)
        for v in data
    }


def _spawn(specs: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    ctx = mp.get_context("spawn")
    out = []
    for spec in specs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=subscriber_main, args=(spec, child), daemon=True)
        proc.start()
        out.append((proc, parent))
    return out


async def _recv(pipe: Any, timeout_s: float) -> Any:
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, pipe.poll, timeout_s):
        raise BenchError("a subscriber process did not answer in time")
    return pipe.recv()


async def measure(
    mode: str, n: int, args: Any, env: dict[str, str] | None, tmp: Path
) -> dict[str, Any]:
    """One (mode, size) cell: start servers, connect n subscribers, run the rounds."""
    servers: list[Server] = []
    baseline = None
    procs: list[tuple[Any, Any]] = []
    try:
        if mode == "broadcast":
            port = _free_port()
            ctx = mp.get_context("spawn")
            baseline = ctx.Process(target=broadcast_main, args=(port,), daemon=True)
            baseline.start()
            urls, key, pids = [f"ws://127.0.0.1:{port}/"], "", [baseline.pid]
            await asyncio.sleep(1.0)  # the bare server has no readiness probe
        else:
            assert env is not None
            count = 2 if mode.endswith("redis-2") else 1
            workers = 2 if mode.endswith("workers-2") else 1
            for i in range(count):
                servers.append(start_relayport(env, tmp / f"{mode}-{n}-{i}.log", workers))
            for server in servers:
                await wait_ready(server, "/readyz")
            admin, env_path, key = await _setup_env(servers[0].base)
            scheme = "http" if mode.startswith("sse") else "ws"
            urls = [
                f"{scheme}{s.base.removeprefix('http')}/v1/client/stream?since=1" for s in servers
            ]
            pids = [s.proc.pid for s in servers]
        before = sum(rss_kib(p) for p in pids if p)
        k = max(1, min(args.client_procs, n // 50))
        transport = "sse" if mode.startswith("sse") else "ws"
        specs = [
            {
                "n": n // k + (1 if i < n % k else 0),
                "urls": urls,
                "key": key,
                "transport": transport,
            }
            for i in range(k)
        ]
        procs = _spawn(specs)
        for _, pipe in procs:
            kind, value = await _recv(pipe, CONNECT_TIMEOUT_S + 10)
            if kind != "ready":
                raise BenchError(f"{mode} n={n}: subscribers failed: {value}")
        await asyncio.sleep(1.0)  # let allocations settle before reading RSS
        per_sub = (sum(rss_kib(p) for p in pids if p) - before) / n
        spies = _spy(args.py_spy, pids, f"{mode}-{n}")
        sent: dict[int, int] = {}
        complete = 0
        for r in range(2, 2 + args.rounds):
            if mode == "broadcast":
                import websockets

                async with websockets.connect(urls[0] + "control") as control:
                    await control.send(str(r))
                    sent[r] = int(await control.recv())
            else:
                import aiohttp

                headers = {"Authorization": f"Bearer {admin}"}
                async with aiohttp.ClientSession(headers=headers) as http:
                    url = f"{servers[0].base}{env_path}/configs/flag"
                    async with http.put(url, json={"value": r}) as response:
                        if response.status != 200:
                            raise BenchError(f"PUT answered {response.status}")
            waiting = len(procs)
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while waiting and time.monotonic() < deadline:
                for _, pipe in procs:
                    if pipe.poll():
                        kind, value = pipe.recv()
                        if kind == "have" and value == r:
                            waiting -= 1
                await asyncio.sleep(0.002)
            complete += waiting == 0
            await asyncio.sleep(0.3)
        _stop_spies(spies)
        if mode != "broadcast":
            sent = await _created_at(servers[0].base, admin, env_path)
        latencies: list[float] = []
        by_server: dict[int, list[float]] = {}
        slowest: dict[int, float] = {}
        fastest: dict[int, float] = {}
        received = 0
        for _, pipe in procs:
            pipe.send("stop")
            while True:
                kind, value = await _recv(pipe, 60)
                if kind == "stamps":
                    break
            for revision, stamps in value.items():
                if int(revision) in sent and int(revision) >= 2:
                    received += len(stamps)
                    lat = [(s - sent[int(revision)]) / 1e6 for s, _ in stamps]
                    latencies += lat
                    for (_, server), ms in zip(stamps, lat, strict=True):
                        by_server.setdefault(server, []).append(ms)
                    slowest[int(revision)] = max(slowest.get(int(revision), 0.0), *lat)
                    fastest[int(revision)] = min(fastest.get(int(revision), 1e9), *lat)
        latencies.sort()
        for values in by_server.values():
            values.sort()
        return {
            "by_server": [by_server[i] for i in sorted(by_server)],
            "mode": mode, "n": n, "rounds": args.rounds, "complete": complete,
            "delivered": received / (n * args.rounds), "latencies": latencies,
            "kib_per_sub": per_sub, "slowest": [round(slowest[r]) for r in sorted(slowest)],
            "fastest": [round(fastest[r], 1) for r in sorted(fastest)],
        }  # fmt: skip
    finally:
        for proc, pipe in procs:
            with contextlib.suppress(OSError, ValueError):
                pipe.close()
            proc.terminate()
            proc.join(5)
        for server in servers:
            stop_server(server)
            report_server_log(f"{mode} n={n}", server)
        if baseline is not None:
            baseline.terminate()
            baseline.join(5)


def _spy(out_dir: str | None, pids: list[int | None], name: str) -> list[Any]:
    """py-spy on each server process during the rounds (raw collapsed stacks, 250 Hz)."""
    import subprocess

    if not out_dir:
        return []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        raise BenchError("--py-spy: no py-spy beside this python or on PATH")
    spies = []
    for i, pid in enumerate(pids):
        output = f"{out_dir}/{name}-server{i + 1}.txt"
        command = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                   "--nonblocking", "--output", output]  # fmt: skip
        if pid:
            spies.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
    return spies


def _stop_spies(spies: list[Any]) -> None:
    import signal

    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(30)


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print("| mode | subscribers | rounds complete | delivered | p50 ms | p99 ms | max ms "
          "| KiB / idle subscriber |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        lat = row["latencies"]
        print(
            f"| {row['mode']} | {row['n']:,} | {row['complete']}/{row['rounds']} "
            f"| {row['delivered']:.1%} | {_pct(lat, 0.5)} | {_pct(lat, 0.99)} "
            f"| {lat[-1] if lat else 0:.1f} | {row['kib_per_sub']:.1f} |"
        )


async def main_async(args: Any) -> int:
    for line in machine_info():
        print(line)
    rows: list[dict[str, Any]] = []
    modes = args.modes.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-config-") as tmp_dir:
        tmp = Path(tmp_dir)
        common = {
            "RELAYPORT_ENV": "development",
            "RELAYPORT_RATELIMIT": json.dumps(RATELIMIT),
            "RELAYPORT_CONFIGS__CLIENT_KEY_REQUESTS_PER_SECOND": "1e9",
            "RELAYPORT_CONFIGS__CLIENT_KEY_BURST": str(10**9),
            "RELAYPORT_TELEMETRY__LOG_LEVEL": "WARNING",
            "RELAYPORT_HTTP__MAX_CONCURRENCY": "100000",
            "RELAYPORT_BROKER_URL": "memory",
            "RELAYPORT_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
            "RELAYPORT_CRYPTO__MASTER_KEYS": json.dumps(
                {"bench": base64.b64encode(os.urandom(32)).decode()}
            ),
            **dict(item.split("=", 1) for item in args.server_env),
        }
        for mode in modes:
            for n in sizes:
                if time.monotonic() - started > args.max_minutes * 60:
                    print(f"time budget spent: skipping {mode} n={n}")
                    continue
                data = tmp / f"{mode}-{n}"
                env: dict[str, str] | None = None
                stack = contextlib.AsyncExitStack()
                async with stack:
                    if mode in ("ws", "sse"):
                        env = _clean_env({**common, "RELAYPORT_DATA_DIR": str(data),
                                          "RELAYPORT_AUTO_MIGRATE": "true"})  # fmt: skip
                    elif mode != "broadcast":
                        url = await stack.enter_async_context(postgres_database(args.pg_url))
                        prefix = await stack.enter_async_context(redis_prefix(args.redis_url))
                        env = _clean_env({
                            **common, "RELAYPORT_DATA_DIR": str(data),
                            "RELAYPORT_DATABASE_URL": url, "RELAYPORT_AUTO_MIGRATE": "false",
                            "RELAYPORT_REDIS_URL": args.redis_url,
                            "RELAYPORT_REDIS_KEY_PREFIX": prefix,
                        })  # fmt: skip
                        if "workers" in mode:  # several processes need a shared broker
                            vhost = stack.enter_context(rabbit_vhost(args.amqp_url))
                            env["RELAYPORT_BROKER_URL"] = vhost
                    try:
                        row = await measure(mode, n, args, env, tmp)
                    except BenchError as exc:
                        print(f"{mode} n={n}: failed: {exc}")
                        continue
                    rows.append(row)
                    lat = row["latencies"]
                    print(f"{mode:>12} n={n:>6}: p50 {_pct(lat, 0.5)} ms, p99 {_pct(lat, 0.99)} "
                          f"ms, delivered {row['delivered']:.1%}, "
                          f"slowest per round {row['slowest']} ms, "
                          f"fastest {row['fastest']} ms", flush=True)  # fmt: skip
                    if len(row["by_server"]) > 1:  # the writer's subscribers, then the others'
                        split = ", ".join(
                            f"server {i + 1}: p50 {_pct(v, 0.5)} / p99 {_pct(v, 0.99)} ms"
                            for i, v in enumerate(row["by_server"])
                        )
                        print(f"{'':>12} by server (the write goes to server 1): {split}",
                              flush=True)  # fmt: skip
    print_table(rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra server setting, e.g. RELAYPORT_X=1")  # fmt: skip
    parser.add_argument("--py-spy", default=None, metavar="DIR",
                        help="profile each server during the rounds into DIR")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
