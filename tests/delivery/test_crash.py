"""A worker SIGKILLed mid-send (PostgreSQL + RabbitMQ): the delivery is sent again once its
lease expires, with the same webhook-id, and is never lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from relayport.core.platform import Platform
from relayport.settings import Settings
from relayport.worker import Worker
from tests.conftest import Account
from tests.delivery.conftest import (
    Receiver,
    create_endpoint,
    eventually,
    message_of,
    send_message,
    wait_for_delivery,
)

WORKER_SCRIPT = """
import asyncio
from relayport.runtime import build_platform
from relayport.settings import Settings
from relayport.worker import Worker

async def main():
    platform = await build_platform(Settings())
    await Worker(platform).start()
    print("WORKER-READY", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _wait_for_line(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 30) -> None:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    output = b""
    deadline = time.monotonic() + timeout
    while marker not in output:
        if proc.poll() is not None or time.monotonic() > deadline:
            output += proc.stdout.read() or b""
            pytest.fail(f"no {marker!r} from the worker:\n{output.decode()}")
        output += proc.stdout.read() or b""
        time.sleep(0.02)


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("settings_overrides", [{"delivery": {"lease_s": 2}}])
async def test_sigkilled_worker_mid_send_delivers_again_with_the_same_id(
    client: httpx.AsyncClient,
    account: Account,
    receiver: Receiver,
    settings: Settings,
    platform: Platform,
    tmp_path: Path,
) -> None:
    lease_s = 2
    receiver.script["/kill"] = ["hang", "ok"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    env = {
        **clean,
        "RELAYPORT_ENV": "test",
        "RELAYPORT_DATA_DIR": str(settings.data_dir),
        "RELAYPORT_DATABASE_URL": settings.database_url,
        "RELAYPORT_BROKER_URL": str(settings.broker_url),
        "RELAYPORT_REDIS_URL": str(settings.redis_url),
        "RELAYPORT_DELIVERY__ALLOW_CIDRS": '["127.0.0.0/8"]',
        "RELAYPORT_DELIVERY__LEASE_S": str(lease_s),
        "RELAYPORT_DELIVERY__TOTAL_TIMEOUT_S": "60",
        "RELAYPORT_OUTBOX__POLL_INTERVAL_MS": "20",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_line(proc, b"WORKER-READY")
        await create_endpoint(client, account, receiver.url("/kill"))
        message = await send_message(client, account)
        await eventually(lambda: len(receiver.at("/kill")) == 1, what="the first request")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        running = (await message_of(client, account, message["id"]))["deliveries"][0]
        assert running["status"] == "sending"
        takeover = Worker(platform)
        await takeover.start()
        try:
            done = await wait_for_delivery(client, account, message["id"], "succeeded", timeout=30)
        finally:
            await takeover.stop(5)
        assert time.monotonic() - killed_at >= lease_s - 0.5
        # The killed attempt never got an answer, so it does not count against the budget.
        assert done["attempts"] == 1
        ids = [r.headers["webhook-id"] for r in receiver.at("/kill")]
        assert ids == [message["id"], message["id"]]
    finally:
        if proc.poll() is None:
            proc.kill()
