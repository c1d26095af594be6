"""Real `relayport serve` processes for the push tests, on the test's backend profile."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _env(settings_kwargs: dict[str, Any], extra: dict[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    env = {
        **clean,
        "RELAYPORT_ENV": "test",
        "RELAYPORT_AUTO_MIGRATE": "false",
        "RELAYPORT_DATA_DIR": str(settings_kwargs["data_dir"]),
        "RELAYPORT_DATABASE_URL": settings_kwargs["database_url"],
        "RELAYPORT_CONFIGS__HEARTBEAT_INTERVAL_S": "1",
        "RELAYPORT_TELEMETRY__LOG_LEVEL": "DEBUG",
    }
    for name in ("redis_url", "broker_url", "redis_key_prefix"):
        if name in settings_kwargs:
            env[f"RELAYPORT_{name.upper()}"] = str(settings_kwargs[name])
    return {**env, **extra}


def start(
    settings_kwargs: dict[str, Any], tmp: Path, port: int | None = None, **extra: str
) -> Server:
    port = port or free_port()
    log = tmp / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relayport", "serve", "--port", str(port)],
            env=_env(settings_kwargs, extra),
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, port, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early ({proc.returncode}):\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail("server never became ready")


@pytest.fixture
def servers(settings_kwargs: dict[str, Any], tmp_path: Path) -> Iterator[list[Server]]:
    """Start servers with `servers_start(n, **env)`; all are stopped after the test."""
    started: list[Server] = []
    yield started
    for server in started:
        server.proc.terminate()
    for server in started:
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
