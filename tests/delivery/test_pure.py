"""The pure parts, tested directly: signing (checked against the official library), the retry
schedule and Retry-After parsing, type filters, the failure window and URL routing."""

from __future__ import annotations

import datetime as dt
import email.utils
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from relayport.delivery import breaker, filters, retry, routing, signing

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


@given(
    msg_id=st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=" ,"),
        min_size=1,
        max_size=40,
    ),
    body=st.dictionaries(st.text(max_size=10), st.integers(), max_size=5),
)
def test_v1_signatures_verify_with_the_official_library(msg_id: str, body: dict[str, int]) -> None:
    import json
    import time

    secret = signing.generate_secret()
    other = signing.generate_secret()
    payload = json.dumps(body).encode()
    now = int(time.time())
    headers = signing.headers(
        [signing.secret_key(secret), signing.secret_key(other)], msg_id, now, payload
    )
    assert Webhook(secret).verify(payload, headers) == body
    assert Webhook(other).verify(payload, headers) == body
    tampered = payload + b" "
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(tampered, headers)


def test_generated_secrets_hold_24_random_bytes() -> None:
    secret = signing.generate_secret()
    assert secret.startswith("whsec_")
    assert len(signing.secret_key(secret)) == 24
    assert secret != signing.generate_secret()


@given(st.text(max_size=80))
def test_secret_parser_accepts_or_raises_invalid_secret(text: str) -> None:
    try:
        key = signing.secret_key(text)
    except signing.InvalidSecret:
        return
    assert 24 <= len(key) <= 64


def test_schedule_with_jitter_stays_within_twenty_percent() -> None:
    rng = random.Random(7)
    schedule = retry.DEFAULT_SCHEDULE_S
    assert retry.delay_after(0, schedule, rng=rng) == 0.0
    for done, base in enumerate(schedule[1:], start=1):
        delays = {retry.delay_after(done, schedule, rng=rng) for _ in range(50)}
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays if d is not None)
        assert len(delays) > 1  # jitter really varies
    assert retry.delay_after(len(schedule), schedule) is None


@given(st.text(max_size=60))
def test_retry_after_parser_never_raises(value: str) -> None:
    result = retry.parse_retry_after(value, NOW)
    assert result is None or result >= 0


def test_retry_after_forms_and_bound() -> None:
    assert retry.parse_retry_after("120", NOW) == 120
    later = email.utils.format_datetime(NOW + dt.timedelta(seconds=90), usegmt=True)
    assert retry.parse_retry_after(later, NOW) == pytest.approx(90)
    assert retry.parse_retry_after("soon", NOW) is None
    assert retry.honour_retry_after(5, 120, cap_s=60) == 60
    assert retry.honour_retry_after(300, 1, cap_s=60) == 300
    assert retry.honour_retry_after(5, None, cap_s=60) == 5


@pytest.mark.parametrize(
    ("filters_", "channels", "event_type", "message_channels", "expected"),
    [
        (None, None, "invoice.paid", None, True),
        (["invoice.*"], None, "invoice.paid", None, True),
        (["invoice.*"], None, "invoice.paid.late", None, True),
        (["invoice.*"], None, "invoices.paid", None, False),
        (["invoice.*"], None, "invoice", None, False),
        (["user.created"], None, "user.created", None, True),
        (["user.created"], None, "user.deleted", None, False),
        (None, None, "endpoint.disabled", None, False),  # operational: only when named
        (["endpoint.*"], None, "endpoint.disabled", None, True),
        (None, ["eu"], "a.b", ["eu", "us"], True),
        (None, ["eu"], "a.b", ["us"], False),
        (None, ["eu"], "a.b", None, False),
        (None, None, "a.b", ["us"], True),
    ],
)
def test_filters(
    filters_: list[str] | None,
    channels: list[str] | None,
    event_type: str,
    message_channels: list[str] | None,
    expected: bool,
) -> None:
    assert filters.accepts(filters_, channels, event_type, message_channels) is expected


def test_failure_window_opens_on_rate_and_forgets_old_outcomes() -> None:
    window = breaker.FailureWindow(window_s=10, min_requests=4, failure_ratio=0.5)
    for t, ok in ((0, False), (1, False), (2, True)):
        window.record(t, ok)
    assert not window.should_open(2)  # too few requests
    window.record(3, True)
    assert window.should_open(3)  # 2 of 4 failed
    assert not window.should_open(11.5)  # the failures left the window
    assert window.failure_rate(11.5) == 0.0


def test_routing_orders() -> None:
    urls = ["a", "b", "c"]
    assert routing.order(urls, "failover") == urls
    assert [routing.order(urls, "round_robin", counter=i)[0] for i in range(4)] == [
        "a",
        "b",
        "c",
        "a",
    ]
    stats = {"a": routing.ArmStats(), "b": routing.ArmStats()}
    for _ in range(30):
        stats["a"].record(False, 0)
        stats["b"].record(True, 0.02)
    rng = random.Random(1)
    firsts = [routing.order(["a", "b"], "adaptive", stats=stats, rng=rng)[0] for _ in range(200)]
    assert firsts.count("b") > 180
    # A slow but healthy URL loses to a fast healthy one most of the time.
    slow = {"a": routing.ArmStats(), "b": routing.ArmStats()}
    for _ in range(30):
        slow["a"].record(True, 3.0)
        slow["b"].record(True, 0.01)
    firsts = [routing.order(["a", "b"], "adaptive", stats=slow, rng=rng)[0] for _ in range(200)]
    assert firsts.count("b") > 140
