"""A real `relayport serve` process: first start migrates, SIGTERM drains and exits 0, and
several instances migrating one PostgreSQL database at once don't race."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from relayport.core import migrate
from relayport.core.db import Database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp_path: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    return subprocess.Popen(
        [sys.executable, "-m", "relayport", "serve", "--port", str(port)],
        env={**clean, "RELAYPORT_DATA_DIR": str(tmp_path / "data"), **env},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"server exited early ({proc.returncode}):\n{out}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail("server never became ready")


def test_first_start_migrates_generates_keys_and_sigterm_drains(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        wait_ready(port, proc)
        data = tmp_path / "data"
        assert (data / "relayport.db").exists()
        assert data.stat().st_mode & 0o777 == 0o700
        for secret in ("master.key", "jwt.key"):
            assert (data / secret).stat().st_mode & 0o777 == 0o600
        body = b'{"email": "drain@example.com", "password": "a long passphrase"}'
        # Send the headers and half the body, then SIGTERM: the request is in flight.
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/auth/signup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:20]
        )
        time.sleep(0.3)  # let the server start reading the request before the signal
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None, "server quit with a request in flight"
        sock.sendall(body[20:])
        response = b""
        sock.settimeout(15)
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
        sock.close()
        assert response.startswith(b"HTTP/1.1 201"), response[:200]
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read().decode() if proc.stdout else ""
        assert '"event": "crypto.master_key_generated"' in log or "master_key_generated" in log
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.postgres
def test_concurrent_migrations_do_not_race(postgres_database_url: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    env = {**clean, "RELAYPORT_DATABASE_URL": postgres_database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relayport", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stderr.read().decode() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in results), results

    async def check() -> tuple[str | None, int]:
        db = Database(postgres_database_url)
        try:
            revision = await migrate.current_revision(db)
        finally:
            await db.dispose()
        conn = await asyncpg.connect(postgres_database_url.replace("+asyncpg", ""))
        try:
            rows = await conn.fetchval("SELECT count(*) FROM alembic_version")
        finally:
            await conn.close()
        return revision, int(rows)

    revision, rows = asyncio.run(check())
    assert revision == migrate.head_revision()
    assert rows == 1


def test_worker_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    env = {**clean, "RELAYPORT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayport", "worker"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output = b""
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while b"worker.started" not in output and time.monotonic() < deadline:
            assert proc.poll() is None, output.decode()
            output += proc.stdout.read() or b""
            time.sleep(0.05)
        assert b"worker.started" in output, output.decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        output += proc.stdout.read() or b""
        assert b"worker.stopped" in output
    finally:
        if proc.poll() is None:
            proc.kill()
