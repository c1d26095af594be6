"""Inbound-webhook metrics, on the platform's one registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from relayport.core.telemetry.metrics import REGISTRY

# `source` is the source id (bounded by the sources tenants create); requests naming no known
# source share one label value, so random ids in URLs cannot grow the label set.
UNKNOWN_SOURCE = "_unknown"

WEBHOOKS_RECEIVED = Counter(
    "webhooks_received_total",
    "Inbound webhook requests by source and result (accepted, duplicate, invalid_signature, "
    "too_large, unsupported_media_type, rate_limited, disabled, not_found, challenge, "
    "unavailable).",
    ["source", "result"],
    registry=REGISTRY,
)
JOBS_CREATED = Counter(
    "jobs_created_total", "Jobs created for newly accepted events.", registry=REGISTRY
)
JOBS_PROCESSED = Counter(
    "jobs_processed_total",
    "Job attempts finished, by outcome (succeeded, retrying, dead).",
    ["status"],
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "job_processing_duration_seconds",
    "Time a job's handler ran, per attempt.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
JOB_RETRIES = Counter(
    "job_retries_total", "Job attempts that failed and were scheduled again.", registry=REGISTRY
)
DLQ_MESSAGES = Counter(
    "dlq_messages_total", "Jobs dead-lettered after their last attempt.", registry=REGISTRY
)
OUTBOX_PENDING = Gauge(
    "outbox_pending",
    "Outbox rows not yet published to the broker (refreshed by the worker's scheduler).",
    registry=REGISTRY,
)
