"""Jobs: the worker runs the source's handler on the CloudEvent, retries with backoff, dead-letters,
re-runs the job of a worker that died once its lease expires; retry, replay and the inbox API."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from relayport.core.platform import Platform
from relayport.ingest import handlers, jobs
from relayport.ingest.models import Job
from relayport.settings import Settings
from relayport.worker import Worker
from tests.conftest import Account
from tests.core.test_auth import assert_problem
from tests.ingest.conftest import (
    create_source,
    deliver,
    eventually,
    job_of,
    wait_for_job,
)


class Recorder:
    """A handler that records events and fails while `failing` is set."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, platform: Platform, event: dict[str, Any]) -> None:
        self.events.append(event)
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise RuntimeError("downstream said no")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    handler = Recorder()
    handlers.register("test-recorder", handler)
    yield handler
    handlers.unregister("test-recorder")


async def test_worker_runs_the_handler_with_the_cloudevent(
    client: httpx.AsyncClient, account: Account, recorder: Recorder, worker: None
) -> None:
    source = await create_source(client, account, scheme="stripe", handler="test-recorder")
    body = b'{"id": "evt_9", "type": "invoice.paid", "data": {"object": {"id": "in_1"}}}'
    accepted = await deliver(client, source, body)
    event_id = accepted.json()["event_id"]
    job = await wait_for_job(client, account, event_id, "succeeded")
    assert job["attempts"] == 1
    assert job["finished_at"] is not None
    assert job["locked_until"] is None
    [event] = recorder.events
    assert event["id"] == event_id
    assert event["type"] == "invoice.paid"
    assert event["subject"] == "in_1"
    assert event["source"] == f"/v1/sources/{source['id']}"
    assert event["data"]["id"] == "evt_9"
    one = await client.get(f"/v1/jobs/{job['id']}", headers=account.headers)
    assert one.json() == job


async def test_failing_handler_retries_with_backoff_then_dies_and_can_be_retried(
    client: httpx.AsyncClient, account: Account, recorder: Recorder, worker: None
) -> None:
    recorder.failing = True
    source = await create_source(client, account, handler="test-recorder", max_attempts=3)
    accepted = await deliver(client, source, b'{"a": 1}', headers={"x-github-event": "ping"})
    event_id = accepted.json()["event_id"]
    dead = await wait_for_job(client, account, event_id, "dead")
    assert dead["attempts"] == 3
    assert dead["last_error"] == "RuntimeError: downstream said no"
    assert len(recorder.events) == 3
    letters = await client.get("/v1/jobs", params={"status": "dead"}, headers=account.headers)
    assert [j["id"] for j in letters.json()["data"]] == [dead["id"]]
    queued = await client.get("/v1/jobs", params={"status": "queued"}, headers=account.headers)
    assert queued.json()["data"] == []
    # Fixed downstream: an operator retries the dead letter.
    recorder.failing = False
    retried = await client.post(f"/v1/jobs/{dead['id']}/retry", headers=account.headers)
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "queued"
    assert retried.json()["attempts"] == 0
    done = await wait_for_job(client, account, event_id, "succeeded")
    assert done["attempts"] == 1
    assert len(recorder.events) == 4
    # Succeeded jobs may be retried too; unknown ones are 404.
    again = await client.post(f"/v1/jobs/{dead['id']}/retry", headers=account.headers)
    assert again.status_code == 200
    await wait_for_job(client, account, event_id, "succeeded")
    missing = await client.post(
        "/v1/jobs/job_01jd000000000000000000000a/retry", headers=account.headers
    )
    assert_problem(missing, 404)


async def test_retrying_an_unfinished_job_is_a_conflict(
    client: httpx.AsyncClient, account: Account, recorder: Recorder, worker: None
) -> None:
    recorder.gate = asyncio.Event()
    source = await create_source(client, account, handler="test-recorder")
    event_id = (await deliver(client, source, b'{"a": 1}')).json()["event_id"]
    running = await wait_for_job(client, account, event_id, "running")
    assert running["locked_until"] is not None
    refused = await client.post(f"/v1/jobs/{running['id']}/retry", headers=account.headers)
    assert_problem(refused, 409, "job-busy")
    recorder.gate.set()
    await wait_for_job(client, account, event_id, "succeeded")


async def test_replay_reruns_the_sources_events_since_a_time(
    client: httpx.AsyncClient, account: Account, recorder: Recorder, worker: None
) -> None:
    source = await create_source(client, account, handler="test-recorder")
    first = (await deliver(client, source, b'{"n": 1}')).json()["event_id"]
    await wait_for_job(client, account, first, "succeeded")
    between = dt.datetime.now(dt.UTC)
    second = (await deliver(client, source, b'{"n": 2}')).json()["event_id"]
    await wait_for_job(client, account, second, "succeeded")
    assert len(recorder.events) == 2
    replayed = await client.post(
        f"/v1/sources/{source['id']}/replay",
        params={"since": between.isoformat()},
        headers=account.headers,
    )
    assert replayed.status_code == 200, replayed.text
    assert replayed.json() == {"replayed": 1}
    await eventually(lambda: len(recorder.events) == 3, what="the replayed event")
    assert recorder.events[-1]["id"] == second
    await wait_for_job(client, account, second, "succeeded")
    everything = await client.post(f"/v1/sources/{source['id']}/replay", headers=account.headers)
    assert everything.json() == {"replayed": 2}
    await eventually(lambda: len(recorder.events) == 5, what="both replayed events")
    naive = await client.post(
        f"/v1/sources/{source['id']}/replay",
        params={"since": "2026-01-01T00:00:00"},
        headers=account.headers,
    )
    assert_problem(naive, 422)


async def test_events_are_listed_newest_first_with_filters_and_cursors(
    client: httpx.AsyncClient, account: Account
) -> None:
    github = await create_source(client, account)
    stripe = await create_source(client, account, scheme="stripe")
    ids = []
    for n in range(3):
        response = await deliver(
            client, github, b'{"n": %d}' % n, headers={"x-github-event": "push"}
        )
        ids.append(response.json()["event_id"])
    middle = dt.datetime.now(dt.UTC)
    response = await deliver(client, stripe, b'{"id": "evt_1", "type": "charge.failed"}')
    ids.append(response.json()["event_id"])

    async def listed(**params: Any) -> dict[str, Any]:
        response = await client.get("/v1/events", params=params, headers=account.headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    assert [e["id"] for e in (await listed())["data"]] == ids[::-1]
    page = await listed(limit=2)
    assert [e["id"] for e in page["data"]] == [ids[3], ids[2]]
    rest = await listed(limit=2, after=page["next"])
    assert [e["id"] for e in rest["data"]] == [ids[1], ids[0]]
    assert rest["next"] is None
    assert len((await listed(source_id=github["id"]))["data"]) == 3
    assert [e["id"] for e in (await listed(type="charge.failed"))["data"]] == [ids[3]]
    assert [e["id"] for e in (await listed(since=middle.isoformat()))["data"]] == [ids[3]]
    assert len((await listed(until=middle.isoformat()))["data"]) == 3
    assert "body" not in (await listed())["data"][0]


async def test_job_of_a_dead_worker_runs_again_after_its_lease(
    client: httpx.AsyncClient,
    account: Account,
    recorder: Recorder,
    platform: Platform,
    worker: None,
) -> None:
    recorder.gate = asyncio.Event()  # hold the first run so the job is not finished under us
    source = await create_source(client, account, handler="test-recorder", max_attempts=3)
    event_id = (await deliver(client, source, b'{"a": 1}')).json()["event_id"]
    job = await wait_for_job(client, account, event_id, "running")
    # Another process claimed it and died: running, lease expired (attempt 1 is spent).
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    async with platform.db.transaction() as session:
        await session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(attempts=2, locked_until=past, next_attempt_at=past)
        )
    recorder.gate.set()
    done = await wait_for_job(client, account, event_id, "succeeded")
    assert done["attempts"] == 3  # the re-run after the lease
    # A lease that expires on the last attempt dead-letters the job instead.
    async with platform.db.transaction() as session:
        await session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(
                status="running",
                attempts=3,
                locked_until=past,
                next_attempt_at=past,
                finished_at=None,
            )
        )
    dead = await wait_for_job(client, account, event_id, "dead")
    assert "lease expired" in dead["last_error"]


# The relay's next poll is an hour away, so no worker sees the job: the test plays them all.
@pytest.mark.parametrize("settings_overrides", [{"outbox": {"poll_interval_ms": 3_600_000}}])
async def test_a_job_runs_once_when_several_workers_get_its_message(
    client: httpx.AsyncClient, account: Account, recorder: Recorder, platform: Platform
) -> None:
    source = await create_source(client, account, handler="test-recorder")
    event_id = (await deliver(client, source, b'{"a": 1}')).json()["event_id"]
    job = await job_of(client, account, event_id)
    assert job["status"] == "queued"
    outcomes = await asyncio.gather(*(jobs.run_job(platform, job["id"]) for _ in range(5)))
    assert outcomes.count("succeeded") == 1
    assert outcomes.count(None) == 4
    assert len(recorder.events) == 1


def test_backoff_is_exponential_with_full_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(1, 20):
        ceiling = min(3600.0, 2.0 ** (attempt - 1))
        delays = [jobs.backoff_s(attempt, base_s=1, cap_s=3600, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole range, not clustered
    assert jobs.backoff_s(10_000, base_s=1, cap_s=3600, rng=rng) <= 3600


async def test_a_source_whose_handler_is_gone_dead_letters_its_jobs(
    client: httpx.AsyncClient, account: Account, worker: None
) -> None:
    handlers.register("test-vanishing", handlers.noop)
    source = await create_source(client, account, handler="test-vanishing", max_attempts=2)
    handlers.unregister("test-vanishing")
    event_id = (await deliver(client, source, b'{"a": 1}')).json()["event_id"]
    dead = await wait_for_job(client, account, event_id, "dead")
    assert "no handler named 'test-vanishing'" in dead["last_error"]


# --- a real worker process killed mid-job (PostgreSQL + RabbitMQ) ------------------------------

WORKER_SCRIPT = """
import asyncio, sys
from relayport.ingest import handlers
from relayport.runtime import build_platform
from relayport.settings import Settings
from relayport.worker import Worker
from relayport.worker import Worker

async def block(platform, event):
    print("HANDLER-STARTED", event["id"], flush=True)
    await asyncio.Event().wait()

handlers.register("test-kill", block)

async def main():
    platform = await build_platform(Settings())
    await Worker(platform).start()
    print("WORKER-READY", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _wait_for_line(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 30) -> bytes:
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
    return output


@pytest.mark.parametrize("backend", ["postgres"])
@pytest.mark.parametrize("settings_overrides", [{"ingest": {"lease_s": 2}}])
async def test_sigkilled_worker_mid_job_the_job_finishes_after_lease_expiry(
    client: httpx.AsyncClient,
    account: Account,
    recorder: Recorder,
    settings: Settings,
    platform: Platform,
    tmp_path: Path,
) -> None:
    lease_s = 2
    handlers.register("test-kill", recorder)  # in this process the handler succeeds
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    env = {
        **clean,
        "RELAYPORT_ENV": "test",
        "RELAYPORT_DATA_DIR": str(settings.data_dir),
        "RELAYPORT_DATABASE_URL": settings.database_url,
        "RELAYPORT_BROKER_URL": str(settings.broker_url),
        "RELAYPORT_REDIS_URL": str(settings.redis_url),
        "RELAYPORT_INGEST__LEASE_S": str(lease_s),
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
        source = await create_source(client, account, handler="test-kill")
        event_id = (await deliver(client, source, b'{"a": 1}')).json()["event_id"]
        _wait_for_line(proc, b"HANDLER-STARTED " + event_id.encode())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        running = await job_of(client, account, event_id)
        assert running["status"] == "running"
        assert running["attempts"] == 1
        # This process's worker takes over: RabbitMQ hands it the unacked message at once, but
        # the job is only run again once the dead worker's lease has expired.
        takeover = Worker(platform)
        await takeover.start()
        try:
            done = await wait_for_job(client, account, event_id, "succeeded", timeout=30)
        finally:
            await takeover.stop(5)
        assert time.monotonic() - killed_at >= lease_s - 0.5
        assert done["attempts"] == 2
        assert [e["id"] for e in recorder.events] == [event_id]
    finally:
        handlers.unregister("test-kill")
        if proc.poll() is None:
            proc.kill()
