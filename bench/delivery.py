"""Outbound webhook delivery: POST /v1/messages → signed deliveries received by a loopback
receiver, against the same number of signed POSTs sent straight with aiohttp.

    .venv/bin/python -m bench.delivery [--fanouts 1,10,100] [--deliveries 3000] [--rate 200]
        [--latency-s 5] [--profiles embedded,postgres] [--concurrency 32]
        [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/0] [--amqp-url amqp://guest:guest@127.0.0.1:5672]
        [--trace DIR]  (stage timestamps per message: see bench/delivery_trace.py)

Processes, all on 127.0.0.1 and started and stopped by this script: one receiver (uvicorn,
uvloop + httptools, a bare ASGI app answering 204 that notes each webhook-id and its arrival
time), Relayport (`embedded`: one process, SQLite + in-process broker and worker; `postgres`:
the API process plus one `relayport worker`, PostgreSQL + RabbitMQ + Redis, a fresh database
and vhost dropped at the end), and this process, which posts the messages.

Per fan-out k (k endpoints, each subscribed to the event type `bench.k<k>`): send
`--deliveries` / k messages as fast as `--concurrency` concurrent POSTs allow (closed loop),
then wait until the receiver has every delivery. deliveries/s = deliveries / (last arrival -
first POST); end-to-end latency = arrival - the time its message's POST was sent.
Latency row: fan-out 1, messages at a fixed `--rate` (open loop) for `--latency-s` seconds.
Baseline: the same number of Standard-Webhooks-signed POSTs sent from this process with one
aiohttp session, 64 at a time: no storage, no queue.

Goals (issue 4): >= 2,000 deliveries/s from one worker process; >= 30% of the baseline; p99
end-to-end <= 50 ms at 200 messages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.http_overhead import (
    ROOT,
    BenchError,
    Server,
    _clean_env,
    _percentile,
    backing,
    machine_info,
    make_api_key,
    report_server_log,
    stop_server,
    wait_ready,
)
from bench.ingest import rabbit_vhost, start

WAIT_S = 120.0


# --- the receiver (its own uvicorn process) ---------------------------------------------------


def receiver_app() -> Any:
    """Answers 204 to every POST and notes (webhook-id, arrival time); GET /stats?since=n
    returns the notes from index n on."""
    seen: list[tuple[str, float]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            since = int((scope["query_string"] or b"since=0").split(b"=")[1] or 0)
            body = json.dumps({"count": len(seen), "events": seen[since:]}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        while (await receive()).get("more_body"):
            pass
        arrived = time.time()
        for name, value in scope["headers"]:
            if name == b"webhook-id":
                seen.append((value.decode(), arrived))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


async def receiver_stats(session: Any, base: str, since: int = 0) -> dict[str, Any]:
    async with session.get(f"{base}/stats?since={since}") as response:
        result: dict[str, Any] = await response.json(content_type=None)
        return result


# --- Relayport --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def relayport(profile: str, args: Any, tmp: Path) -> AsyncIterator[Server]:
    async with backing(profile, args, tmp / f"{profile}-data") as env:
        # Default settings otherwise (the outbox relay polls every 200 ms): new messages are
        # published straight after their commit, not by the relay's poll.
        env = env | {"RELAYPORT_DELIVERY__ALLOW_CIDRS": '["127.0.0.0/8"]'}
        with contextlib.ExitStack() as stack:
            if profile != "embedded":
                env["RELAYPORT_BROKER_URL"] = stack.enter_context(rabbit_vhost(args.amqp_url))
            if args.trace:
                env["BENCH_TRACE_DIR"] = args.trace  # made absolute by main()
            factory = "bench.delivery_trace:traced_app" if args.trace else None
            app = start(
                factory or "bench.http_overhead:relayport_app", _clean_env(env), tmp / "api.log"
            )
            worker = None
            try:
                await wait_ready(app, "/healthz")
                if profile != "embedded":
                    log = (tmp / "worker.log").open("wb")
                    module = "bench.delivery_trace" if args.trace else "relayport"
                    worker = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited
                        [sys.executable, "-m", module, "worker"],
                        cwd=ROOT,
                        env=_clean_env(env),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                yield app
            finally:
                report_server_log(f"{profile} api", app)
                stop_server(app)
                if worker is not None:
                    worker.terminate()
                    try:
                        worker.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        worker.kill()


async def make_endpoints(session: Any, base: str, key: str, receiver: str, k: int) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    for i in range(k):
        spec = {"url": f"{receiver}/k{k}/{i}", "filter_types": [f"bench.k{k}"]}
        async with session.post(f"{base}/v1/endpoints", json=spec, headers=auth) as r:
            if r.status != 201:
                raise BenchError(f"endpoint creation answered {r.status}: {await r.text()}")


async def post_messages(
    session: Any,
    base: str,
    key: str,
    k: int,
    count: int,
    concurrency: int,
    rate: float | None,
    answered: dict[str, float] | None = None,
) -> dict[str, float]:
    """POST `count` messages of type bench.k<k>; returns message id -> send time. Closed loop
    with `concurrency` workers, or open loop at `rate` per second. `answered`, if given,
    gets each message's answer time."""
    auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    sent: dict[str, float] = {}
    body = json.dumps({"event_type": f"bench.k{k}", "payload": {"amount": 42, "pad": "x" * 200}})

    async def one() -> None:
        import aiohttp

        started = time.time()
        # A pooled connection the server closed while idle (uvicorn's keep-alive timeout) fails
        # on reuse; the idempotency key makes sending again safe.
        headers = auth | {"Idempotency-Key": secrets.token_hex(12)}
        for attempt in range(3):
            try:
                async with session.post(f"{base}/v1/messages", data=body, headers=headers) as r:
                    if r.status not in (200, 202):  # 200: a resend already stored
                        detail = await r.text()
                        raise BenchError(f"POST /v1/messages answered {r.status}: {detail}")
                    message_id = (await r.json())["id"]
                    sent[message_id] = started
                    if answered is not None:
                        answered[message_id] = time.time()
                    return
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if attempt == 2:
                    raise

    if rate is None:
        queue = iter(range(count))

        async def loop() -> None:
            for _ in queue:
                await one()

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    else:
        start_at = time.monotonic()
        tasks = []
        for i in range(count):
            delay = start_at + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return sent


async def await_deliveries(
    session: Any, receiver: str, since: int, expected: int
) -> list[tuple[str, float]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        stats = await receiver_stats(session, receiver, since)
        if len(stats["events"]) >= expected or time.monotonic() > deadline:
            return [(e[0], e[1]) for e in stats["events"]]
        await asyncio.sleep(0.05)


def summarize(
    sent: dict[str, float], events: list[tuple[str, float]], expected: int
) -> dict[str, Any]:
    latencies = sorted(int((t - sent[i]) * 1e6) for i, t in events if i in sent)
    first = min(sent.values())
    last = max(t for _, t in events) if events else first
    return {
        "delivered": len(events),
        "expected": expected,
        "rate": len(events) / max(last - first, 1e-9),
        "p50": _percentile(latencies, 0.50) / 1000 if latencies else None,
        "p99": _percentile(latencies, 0.99) / 1000 if latencies else None,
    }


# --- the baseline -----------------------------------------------------------------------------


async def baseline(receiver: str, count: int) -> dict[str, Any]:
    """`count` signed POSTs straight to the receiver, 64 in flight, one aiohttp session."""
    import aiohttp

    from relayport.delivery import signing

    key = signing.secret_key(signing.generate_secret())
    body = json.dumps({"type": "bench", "data": {"amount": 42, "pad": "x" * 200}}).encode()
    latencies: list[int] = []
    todo = iter(range(count))
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def loop() -> None:
            for i in todo:
                headers = signing.headers([key], f"msg_{i}", int(time.time()), body)
                headers["content-type"] = "application/json"
                started = time.perf_counter()
                async with session.post(f"{receiver}/baseline", data=body, headers=headers) as r:
                    await r.read()
                latencies.append(int((time.perf_counter() - started) * 1e6))

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(64)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "delivered": count,
        "expected": count,
        "rate": count / elapsed,
        "p50": _percentile(latencies, 0.5) / 1000,
        "p99": _percentile(latencies, 0.99) / 1000,
    }


# --- the run ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


async def run_profile(profile: str, args: Any, receiver: Server, tmp: Path) -> list[list[str]]:
    import aiohttp

    rows: list[list[str]] = []
    fanouts = [int(f) for f in args.fanouts.split(",")]
    async with (
        relayport(profile, args, tmp) as app,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session,
    ):
        key = await make_api_key(app.base)
        for k in sorted({*fanouts, 1}):
            await make_endpoints(session, app.base, key, receiver.base, k)
        # Warm-up: connections, caches, the first fan-out of each endpoint.
        since = (await receiver_stats(session, receiver.base, 10**9))["count"]
        await post_messages(session, app.base, key, 1, 50, 8, None)
        since = len(await await_deliveries(session, receiver.base, since, 50)) + since
        for k in fanouts:
            messages = max(1, args.deliveries // k)
            expected = messages * k
            sent = await post_messages(session, app.base, key, k, messages, args.concurrency, None)
            events = await await_deliveries(session, receiver.base, since, expected)
            since += len(events)
            result = summarize(sent, events, expected)
            base = await baseline(receiver.base, expected)
            since = (await receiver_stats(session, receiver.base, 10**9))["count"]
            rows.append(_row(profile, f"fan-out {k}", result, base))
            print("  " + " | ".join(rows[-1]), flush=True)
        count = int(args.rate * args.latency_s)
        answered: dict[str, float] = {}
        sent = await post_messages(session, app.base, key, 1, count, 0, args.rate, answered)
        events = await await_deliveries(session, receiver.base, since, count)
        if args.trace:
            note = {"sent": sent, "answered": answered, "arrivals": events}
            (Path(args.trace) / f"bench-{profile}.json").write_text(json.dumps(note))
        result = summarize(sent, events, count)
        rows.append(_row(profile, f"{args.rate:g} msg/s, fan-out 1", result, None))
        print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def _row(profile: str, case: str, r: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    return [
        profile,
        case,
        f"{r['delivered']}/{r['expected']}",
        _fmt(r["rate"], 0),
        _fmt(r["p50"]),
        _fmt(r["p99"]),
        "-" if base is None else _fmt(base["rate"], 0),
        "-" if base is None else _fmt(base["p99"]),
        "-" if base is None else f"{r['rate'] / base['rate']:.0%}",
    ]


async def main_async(args: Any) -> int:
    info = machine_info()  # its load average is the one at the start of the run
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as name:
        tmp = Path(name)
        receiver = start("bench.delivery:receiver_app", _clean_env(), tmp / "receiver.log")
        try:
            await wait_ready(receiver, "/stats")
            rows: list[list[str]] = []
            for profile in args.profiles.split(","):
                print(f"profile {profile} …", flush=True)
                rows += await run_profile(profile, args, receiver, tmp)
        finally:
            stop_server(receiver)
    print()
    for line in info:
        print(line)
    header = [
        "profile", "case", "delivered", "deliveries/s", "e2e p50 ms", "e2e p99 ms",
        "aiohttp straight/s", "straight p99 ms", "ratio",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + ["--:"] * 7) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--fanouts", default="1,10,100")
    parser.add_argument("--deliveries", type=int, default=3000, help="per fan-out row")
    parser.add_argument("--rate", type=float, default=200, help="messages/s of the latency row")
    parser.add_argument("--latency-s", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent POSTs")
    parser.add_argument("--profiles", default="embedded,postgres")
    parser.add_argument(
        "--trace",
        metavar="DIR",
        help="stage timestamps of the latency row into DIR (bench.delivery_trace); "
        "summarize with python -m bench.delivery_trace summary DIR",
    )
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672")
    args = parser.parse_args(argv)
    if args.trace:
        args.trace = os.path.abspath(args.trace)
    try:
        return asyncio.run(main_async(args))
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
