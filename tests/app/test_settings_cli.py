"""Bad settings stop the process with exit code 2 and one line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAYPORT_")}
    return subprocess.run(
        [sys.executable, "-m", "relayport", *args],
        env={**clean, "RELAYPORT_DATA_DIR": str(tmp_path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RELAYPORT_DATABASE_URL": "postgresql://::bad::"}, "RELAYPORT_DATABASE_URL"),
        ({"RELAYPORT_DATABASE_URL": "mysql://localhost/db"}, "unknown database backend"),
        ({"RELAYPORT_BROKER_URL": "kafka://localhost"}, "unknown broker backend"),
        ({"RELAYPORT_REDIS_URL": "memcached://localhost"}, "unknown cache backend"),
        ({"RELAYPORT_ENV": "production", "RELAYPORT_AUTH__JWT_SECRET": "short"}, "weak JWT"),
        ({"RELAYPORT_ENV": "production"}, "weak JWT"),
        ({"RELAYPORT_PORT": "eighty"}, "RELAYPORT_PORT"),
        ({"RELAYPORT_HTTP__TRUSTED_PROXIES": '["not-a-cidr"]'}, "not a CIDR"),
        ({"RELAYPORT_HTTP__CORS_ORIGINS": '["*"]'}, "CORS origin"),
        ({"RELAYPORT_CRYPTO__MASTER_KEYS": '{"k1": "too-short"}'}, "base64 of 32 bytes"),
        ({"RELAYPORT_WORKERS": "4"}, "RELAYPORT_BROKER_URL"),
        (
            {
                "RELAYPORT_RATELIMIT__PLANS": '{"pro": {"requests_per_second": 1, "burst": 1, '
                '"daily_quota": 1}}'
            },
            'define "free"',
        ),
        (
            {
                "RELAYPORT_AUTH__JWT_ALGORITHM": "EdDSA",
                "RELAYPORT_AUTH__JWT_PRIVATE_KEY_FILE": "/nonexistent.pem",
            },
            "not a readable file",
        ),
    ],
)
def test_bad_setting_exits_2_with_one_line(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    result = run_cli(tmp_path, env, "serve")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_malformed_database_url_does_not_echo_its_password(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, {"RELAYPORT_DATABASE_URL": "postgresql//app:S3cretDbPass@db/x"}, "migrate"
    )
    assert result.returncode == 2
    assert "S3cretDbPass" not in result.stderr + result.stdout


def test_migrate_then_admin_commands_make_a_working_key(tmp_path: Path) -> None:
    assert run_cli(tmp_path, {}, "migrate").returncode == 0
    tenant = run_cli(tmp_path, {}, "admin", "create-tenant", "--name", "Ops")
    assert tenant.returncode == 0, tenant.stderr
    tenant_id = tenant.stdout.strip().splitlines()[-1]
    assert tenant_id.startswith("ten_")
    key = run_cli(tmp_path, {}, "admin", "create-key", "--tenant", tenant_id, "--name", "bootstrap")
    assert key.returncode == 0, key.stderr
    assert key.stdout.strip().splitlines()[-1].startswith("rp_")
    missing = run_cli(tmp_path, {}, "admin", "create-key", "--tenant", "ten_nope", "--name", "x")
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr
