"""Outbound-webhook metrics, on the platform's one registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from relayport.core.telemetry.metrics import REGISTRY

DELIVERIES = Counter(
    "deliveries_total",
    "Delivery attempts finished, by result (succeeded, retrying, dead, deferred).",
    ["result"],
    registry=REGISTRY,
)
ATTEMPT_DURATION = Histogram(
    "delivery_attempt_duration_seconds",
    "Time of one HTTP attempt, from connect to the end of the kept response.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0),
    registry=REGISTRY,
)
END_TO_END = Histogram(
    "delivery_end_to_end_seconds",
    "From a message's acceptance to its successful delivery to one endpoint.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600, 36000, 100000),
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "endpoint_circuit_state",
    "Circuit breaker state per endpoint as this worker last set or saw it "
    "(0 closed, 1 open, 2 half-open).",
    ["endpoint"],
    registry=REGISTRY,
)
ATTEMPTS_PER_MESSAGE = Histogram(
    "attempts_per_message",
    "Attempts a delivery took until it succeeded or died.",
    buckets=(1, 2, 3, 4, 5, 6, 7, 8, 10, 15, 20, 50),
    registry=REGISTRY,
)

CIRCUIT_VALUES = {"closed": 0, "open": 1, "half_open": 2}
