"""Settings: every knob comes from `RELAYPORT_*` environment variables (nested with `__`) or `.env`.

Validation happens once at start; `relayport` turns a `ValidationError` into a one-line reason and
exit code 2. Nothing else in the code reads `os.environ`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MIN_JWT_SECRET_BYTES = 32


class PlanLimits(BaseModel):
    """Limits a tenant gets from its plan."""

    requests_per_second: float = Field(gt=0)
    burst: int = Field(gt=0)
    daily_quota: int = Field(gt=0, description="Requests per UTC day.")


def _default_plans() -> dict[str, PlanLimits]:
    return {
        "free": PlanLimits(requests_per_second=50, burst=100, daily_quota=100_000),
        "pro": PlanLimits(requests_per_second=500, burst=1_000, daily_quota=5_000_000),
        "enterprise": PlanLimits(requests_per_second=5_000, burst=10_000, daily_quota=500_000_000),
    }


class HttpSettings(BaseModel):
    body_limit_bytes: int = Field(default=1_048_576, gt=0)
    max_concurrency: int = Field(default=512, gt=0, description="In-flight requests per process.")
    concurrency_retry_after_s: int = Field(default=1, ge=0)
    cors_origins: list[str] = Field(default_factory=list)
    trusted_proxies: list[str] = Field(
        default_factory=list, description="CIDRs whose X-Forwarded-For is believed."
    )
    security_headers: bool = True

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if (
                origin == "*"
                or parts.scheme not in ("http", "https")
                or not parts.netloc
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
            ):
                raise ValueError(f"CORS origin must look like https://host[:port], not {origin!r}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a CIDR: {cidr!r}") from exc
        return value


class AuthSettings(BaseModel):
    jwt_algorithm: Literal["HS256", "EdDSA", "RS256"] = "HS256"
    jwt_secret: SecretStr | None = Field(
        default=None,
        description="HS256 key. Generated into data_dir when unset outside production.",
    )
    jwt_private_key_file: Path | None = Field(default=None, description="PEM key for EdDSA/RS256.")
    jwt_kid: str = "k1"
    jwt_issuer: str = "relayport"
    access_token_ttl_s: int = Field(default=900, gt=0)
    refresh_token_ttl_s: int = Field(default=30 * 24 * 3600, gt=0)
    max_failed_logins: int = Field(default=10, gt=0, description="Per email per 15 minutes.")


class CryptoSettings(BaseModel):
    master_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Key id -> base64 of 32 random bytes. Generated into data_dir when empty "
        "outside production.",
    )
    active_key_id: str | None = None


class RateLimitSettings(BaseModel):
    enabled: bool = True
    ip_requests_per_second: float = Field(default=200, gt=0)
    ip_burst: int = Field(default=400, gt=0)
    principal_requests_per_second: float = Field(default=100, gt=0)
    principal_burst: int = Field(default=200, gt=0)
    plans: dict[str, PlanLimits] = Field(default_factory=_default_plans)

    @field_validator("plans")
    @classmethod
    def _has_free(cls, value: dict[str, PlanLimits]) -> dict[str, PlanLimits]:
        if "free" not in value:
            raise ValueError('plans must define "free", the plan of new tenants')
        return value


class TelemetrySettings(BaseModel):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP traces endpoint.")
    service_name: str = "relayport"


class OutboxSettings(BaseModel):
    batch_size: int = Field(default=100, gt=0, le=10_000)
    poll_interval_ms: int = Field(default=200, gt=0)
    max_publish_backoff_ms: int = Field(default=30_000, gt=0)


class IngestSettings(BaseModel):
    """Inbound webhooks: job leases, retries, the scheduler and per-source limits."""

    lease_s: float = Field(
        default=60, gt=0, description="How long a worker owns a running job before another may."
    )
    scheduler_interval_s: float = Field(default=1.0, gt=0, le=60)
    max_attempts: int = Field(default=8, ge=1, le=100, description="Default for new sources.")
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_cap_s: float = Field(default=3600, gt=0)
    requeue_stuck_after_s: float = Field(
        default=300, gt=0, description="Re-publish a job still queued after this long."
    )
    source_requests_per_second: float = Field(default=1000, gt=0)
    source_burst: int = Field(default=2000, gt=0)
    source_cache_ttl_s: float = Field(default=5, ge=0)
    # Group commit of accepted deliveries: concurrent requests' rows share one transaction.
    batch_max_rows: int = Field(
        default=100, ge=1, le=1000, description="Most deliveries stored in one transaction."
    )
    batch_max_wait_ms: float = Field(
        default=2.0,
        ge=0,
        le=50,
        description="Longest a delivery waits for others to share its transaction.",
    )
    batch_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Transactions of deliveries written at once (PostgreSQL; SQLite uses 1).",
    )


def _b64decode(value: str) -> bytes:
    text = value.strip()
    try:
        return base64.b64decode(
            text + "=" * (-len(text) % 4),
            altchars=b"-_" if "-" in text or "_" in text else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        return b""


class DeliverySettings(BaseModel):
    """Outbound webhooks: sending, retries, breakers, the SSRF allow-list."""

    allow_cidrs: list[str] = Field(
        default_factory=list,
        description="Private networks endpoints may reach (and over plain http), e.g. "
        '["127.0.0.0/8"]; everything non-public is refused otherwise.',
    )
    connect_timeout_s: float = Field(default=15, gt=0)
    total_timeout_s: float = Field(default=15, gt=0)
    user_agent: str = "Relayport-Webhooks/0.1"
    pool_limit: int = Field(default=512, gt=0, description="Connections per worker process.")
    pool_limit_per_host: int = Field(default=64, gt=0)
    concurrency: int = Field(
        default=256, gt=0, description="Deliveries a worker process sends at once."
    )
    retry_schedule_s: list[float] = Field(
        default_factory=lambda: [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        min_length=1,
        max_length=50,
        description="Delay before each attempt; its length is the number of attempts.",
    )
    retry_jitter: float = Field(default=0.2, ge=0, lt=1)
    retry_after_max_s: float = Field(
        default=3600, gt=0, description="Upper bound on a receiver's Retry-After."
    )
    lease_s: float = Field(
        default=60, gt=0, description="How long a worker owns a delivery it is sending."
    )
    scheduler_interval_s: float = Field(default=1.0, gt=0, le=60)
    requeue_stuck_after_s: float = Field(default=300, gt=0)
    idempotency_ttl_s: float = Field(default=86_400, gt=0)
    secret_grace_s: int = Field(default=86_400, ge=0, description="Default rotation grace.")
    breaker_window_s: float = Field(default=60, gt=0)
    breaker_min_requests: int = Field(default=10, ge=1)
    breaker_failure_ratio: float = Field(default=0.5, gt=0, le=1)
    breaker_open_s: float = Field(default=30, gt=0, description="Wait before a half-open probe.")
    disable_after_s: float = Field(
        default=5 * 86_400, gt=0, description="Disable an endpoint failing this long."
    )

    @field_validator("allow_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                raise ValueError(f"not a CIDR: {cidr!r}") from exc
        return value

    @field_validator("retry_schedule_s")
    @classmethod
    def _schedule(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError("retry delays are >= 0")
        return value


class ConfigsSettings(BaseModel):
    """Live configuration: push streams, heartbeats, the recent-version buffer."""

    # Idle streams get a heartbeat this often (proxies close silent connections near 60 s).
    heartbeat_interval_s: float = Field(default=15.0, gt=0, le=300)
    # Versions kept per environment in each process to answer reconnects with a delta;
    # a client further behind gets a snapshot.
    recent_versions: int = Field(default=64, ge=1, le=10_000)
    long_poll_max_wait_s: float = Field(default=30.0, gt=0, le=300)
    # Events queued per subscriber before it counts as slow and is disconnected to resync.
    subscriber_queue: int = Field(default=256, ge=1, le=100_000)
    # Bytes waiting in a streaming subscriber's socket buffer beyond which it counts as slow
    # (events are written to the socket directly; see configs/wire.py).
    subscriber_buffer_bytes: int = Field(default=1_048_576, ge=4096, le=1 << 30)
    # A stream closed for falling behind gets this long to take its close frame before the
    # connection is aborted (a stalled reader must not hold memory).
    slow_close_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # A client marked connected whose instance has not confirmed it for this many heartbeat
    # intervals counts as gone (its instance crashed or lost the database).
    connected_expiry_beats: int = Field(default=3, ge=2, le=100)
    # Token bucket per client key over the client routes (config reads, long-polls, stream
    # connects, acks); WebSocket connects also spend the per-IP bucket of `ratelimit`.
    client_key_requests_per_second: float = Field(default=200, gt=0)
    client_key_burst: int = Field(default=2_000, gt=0)
    max_value_bytes: int = Field(default=262_144, ge=1024, le=16_777_216)
    # From this many subscribers in a process, freeze long-lived objects out of the cyclic GC
    # at each doubling (0: never). See configs/push.py Hub._gc_freeze.
    gc_freeze_from: int = Field(default=1_000, ge=0)
    # A committed version is announced to the other processes with its public event (the
    # patch without secret values) when the message fits in this many bytes; a larger one is
    # announced by environment id alone, and each process reads it from the database.
    announce_max_bytes: int = Field(default=65_536, ge=0, le=16_777_216)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAYPORT_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        hide_input_in_errors=True,  # inputs include secrets and URLs with passwords
    )

    env: Literal["development", "production", "test"] = "development"
    data_dir: Path = Path(".relayport")
    database_url: str = ""
    redis_url: str | None = None
    redis_max_connections: int = Field(default=64, gt=0, le=10_000)
    redis_key_prefix: str = Field(
        default="relayport:", min_length=1, description="Namespace for every Redis key and channel."
    )
    broker_url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    shutdown_timeout_s: float = Field(default=20, gt=0)
    gc_freeze: bool = Field(
        default=True,
        description="Move the started process's objects out of the cyclic GC (gc.freeze) after "
        "startup and at the first ingest delivery or job, so full collections stay short.",
    )
    db_pool_size: int = Field(default=10, gt=0)
    auto_migrate: bool | None = Field(
        default=None, description="Run migrations at start; default on for the embedded SQLite."
    )
    http: HttpSettings = Field(default_factory=HttpSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    crypto: CryptoSettings = Field(default_factory=CryptoSettings)
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    configs: ConfigsSettings = Field(default_factory=ConfigsSettings)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value:
            return value
        try:
            url = make_url(value)
        except ArgumentError:
            # The URL may carry a password: never echo it.
            raise ValueError("malformed database URL") from None
        backend = url.get_backend_name()
        if backend == "sqlite":
            return url.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
        if backend in ("postgresql", "postgres"):
            return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        raise ValueError(f"unknown database backend {backend!r} (use sqlite or postgresql)")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"unknown cache backend in {value.split(':', 1)[0]!r} (use redis://)")
        return value or None

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value in (None, "", "memory"):
            return None
        assert value is not None
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError(
                f"unknown broker backend {value.split(':', 1)[0]!r} (use amqp:// or memory)"
            )
        return value

    @model_validator(mode="after")
    def _fill_and_check(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'relayport.db'}"
        if self.env == "production":
            if self.auth.jwt_algorithm == "HS256":
                secret = self.auth.jwt_secret.get_secret_value() if self.auth.jwt_secret else ""
                if len(secret.encode()) < MIN_JWT_SECRET_BYTES:
                    raise ValueError(
                        "weak JWT secret: production needs RELAYPORT_AUTH__JWT_SECRET of at least "
                        f"{MIN_JWT_SECRET_BYTES} bytes"
                    )
            if not self.crypto.master_keys:
                raise ValueError("production needs RELAYPORT_CRYPTO__MASTER_KEYS")
        elif (
            self.auth.jwt_secret is not None
            and len(self.auth.jwt_secret.get_secret_value().encode()) < MIN_JWT_SECRET_BYTES
        ):
            raise ValueError(f"weak JWT secret: use at least {MIN_JWT_SECRET_BYTES} bytes")
        if self.auth.jwt_algorithm != "HS256" and self.auth.jwt_private_key_file is None:
            raise ValueError(
                f"{self.auth.jwt_algorithm} needs RELAYPORT_AUTH__JWT_PRIVATE_KEY_FILE"
            )
        if self.crypto.active_key_id and self.crypto.active_key_id not in self.crypto.master_keys:
            raise ValueError("crypto.active_key_id names no key in crypto.master_keys")
        for kid, key in self.crypto.master_keys.items():
            if len(_b64decode(key.get_secret_value())) != 32:
                raise ValueError(f"crypto.master_keys[{kid!r}] is not base64 of 32 bytes")
        key_file = self.auth.jwt_private_key_file
        if self.auth.jwt_algorithm != "HS256" and key_file is not None and not key_file.is_file():
            raise ValueError(f"auth.jwt_private_key_file {str(key_file)!r} is not a readable file")
        if self.workers > 1 and self.broker_url is None:
            raise ValueError(
                "several server processes need RELAYPORT_BROKER_URL (RabbitMQ) and "
                "RELAYPORT_DATABASE_URL (PostgreSQL): the in-process broker is per process"
            )
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                "several server processes need RELAYPORT_REDIS_URL: the in-process pub/sub, "
                "rate limits and caches are per process (live configuration changes would "
                "reach only the process that committed them)"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        """True when the broker is in-process, so `serve` also runs the worker."""
        return self.broker_url is None

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate
