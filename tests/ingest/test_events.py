"""Normalization: dedup keys, event types, JSON pointers, CloudEvents envelopes."""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayport.ingest.events import (
    FALLBACK_TYPE,
    MAX_TYPE_CHARS,
    dedup_key,
    event_type,
    parse_json,
    resolve_pointer,
    to_cloudevent,
    validate_pointer,
)
from relayport.ingest.signatures import SCHEMES, Verified, generate_secret, sign, verify

NOW = 1_700_000_000.0
BODY = b'{"id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "type": "invoice.paid"}'


def _hash(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


# --- dedup keys ----------------------------------------------------------------------------------


def test_dedup_key_github_uses_the_delivery_header() -> None:
    secret = generate_secret("github")
    headers = sign("github", BODY, secret, now=NOW, msg_id="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    verified = verify("github", headers, BODY, [secret], now=NOW)
    key = dedup_key("github", verified, headers, BODY, parse_json(BODY))
    assert key == "72d3162e-cc78-11e3-81ab-4c9367dc0958"


def test_dedup_key_github_without_a_usable_delivery_falls_back_to_the_body_hash() -> None:
    secret = generate_secret("github")
    headers = sign("github", BODY, secret, now=NOW)
    for delivery in (None, "", "has space", "x" * 300, "é"):
        h = headers if delivery is None else {**headers, "x-github-delivery": delivery}
        verified = verify("github", h, BODY, [secret], now=NOW)
        assert verified.delivery_id is None
        assert dedup_key("github", verified, h, BODY, None) == _hash(BODY)


@pytest.mark.parametrize("prefix", ["webhook", "svix"])
def test_dedup_key_standard_uses_the_message_id(prefix: str) -> None:
    secret = generate_secret("standard")
    headers = sign("standard", BODY, secret, now=NOW, msg_id="msg_2Lh9KRb0pzN4LePd3XiA")
    headers = {k.replace("webhook", prefix): v for k, v in headers.items()}
    verified = verify("standard", headers, BODY, [secret], now=NOW)
    assert dedup_key("standard", verified, headers, BODY, None) == "msg_2Lh9KRb0pzN4LePd3XiA"


def test_dedup_key_stripe_uses_the_event_id_not_the_signature() -> None:
    payload = parse_json(BODY)
    # A retry carries a new timestamp and signature: the key must not change.
    first = Verified(timestamp=int(NOW))
    retry = Verified(timestamp=int(NOW) + 3600)
    assert dedup_key("stripe", first, {}, BODY, payload) == "evt_1NG8Du2eZvKYlo2CUI79vXWy"
    assert dedup_key("stripe", retry, {}, BODY, payload) == "evt_1NG8Du2eZvKYlo2CUI79vXWy"


@pytest.mark.parametrize(
    "payload", [None, [], "evt_1", {"id": 42}, {"id": ""}, {"id": "a b"}, {"id": "x" * 300}, {}]
)
def test_dedup_key_stripe_without_a_usable_id_hashes_the_body(payload: Any) -> None:
    assert dedup_key("stripe", Verified(), {}, BODY, payload) == _hash(BODY)


@pytest.mark.parametrize("scheme", ["shopify", "slack", "hmac"])
def test_dedup_key_other_schemes_hash_the_raw_body(scheme: str) -> None:
    payload = parse_json(BODY)
    key = dedup_key(scheme, Verified(delivery_id="ignored"), {"x-id": "1"}, BODY, payload)
    assert key == _hash(BODY)
    # The raw bytes, not a re-serialization: equal JSON with other spacing is another key.
    reserialized = json.dumps(payload, separators=(",", ":")).encode()
    assert dedup_key(scheme, Verified(), {}, reserialized, payload) != key


# --- event types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "headers", "payload", "expected"),
    [
        ("github", {"x-github-event": "issues"}, {"action": "opened"}, "issues.opened"),
        ("github", {"x-github-event": "push"}, {"ref": "refs/heads/main"}, "push"),
        ("github", {"x-github-event": "push"}, None, "push"),
        ("github", {"x-github-event": "issues"}, {"action": 3}, "issues"),
        ("github", {}, {"action": "opened"}, FALLBACK_TYPE),
        ("stripe", {}, {"type": "invoice.paid"}, "invoice.paid"),
        ("stripe", {}, {"type": None}, FALLBACK_TYPE),
        ("stripe", {}, ["invoice.paid"], FALLBACK_TYPE),
        ("standard", {}, {"type": "user.created", "data": {}}, "user.created"),
        ("standard", {}, {"data": {}}, FALLBACK_TYPE),
        ("shopify", {"x-shopify-topic": "orders/create"}, {"id": 1}, "orders/create"),
        ("shopify", {}, {"id": 1}, FALLBACK_TYPE),
        ("slack", {}, {"type": "url_verification"}, "url_verification"),
        (
            "slack",
            {},
            {"type": "event_callback", "event": {"type": "message"}},
            "event_callback.message",
        ),
        ("slack", {}, {"type": "event_callback", "event": "x"}, "event_callback"),
        ("slack", {}, {"type": "block_actions", "event": {"type": "message"}}, "block_actions"),
        ("slack", {}, None, FALLBACK_TYPE),  # form-encoded slash commands are not JSON
    ],
)
def test_event_type_per_scheme(
    scheme: str, headers: dict[str, str], payload: Any, expected: str
) -> None:
    assert event_type(scheme, headers, payload, type_pointer=None) == expected


@pytest.mark.parametrize(
    ("pointer", "payload", "expected"),
    [
        ("/type", {"type": "order.paid"}, "order.paid"),
        ("/meta/event", {"meta": {"event": "a.b"}}, "a.b"),
        ("/events/1/kind", {"events": [{"kind": "x"}, {"kind": "y"}]}, "y"),
        ("/a~1b/c~0d", {"a/b": {"c~d": "escaped"}}, "escaped"),
        ("/events/2/kind", {"events": [{"kind": "x"}]}, FALLBACK_TYPE),
        ("/events/01", {"events": ["x", "y"]}, FALLBACK_TYPE),
        ("/events/-", {"events": ["x"]}, FALLBACK_TYPE),
        ("/type", {"type": 7}, FALLBACK_TYPE),
        ("/type", {"type": {"nested": "x"}}, FALLBACK_TYPE),
        ("/type", {"type": "bad\nline"}, FALLBACK_TYPE),
        ("/type", "not an object", FALLBACK_TYPE),
        ("", "whole-document", "whole-document"),
    ],
)
def test_event_type_hmac_json_pointer(pointer: str, payload: Any, expected: str) -> None:
    assert event_type("hmac", {}, payload, type_pointer=pointer) == expected


def test_event_type_hmac_without_pointer_and_bad_pointer() -> None:
    assert event_type("hmac", {}, {"type": "x"}, type_pointer=None) == FALLBACK_TYPE
    with pytest.raises(ValueError, match="RFC 6901"):
        event_type("hmac", {}, {"type": "x"}, type_pointer="type")


def test_event_type_is_cut_to_200_characters() -> None:
    long = "a" * 500
    assert event_type("stripe", {}, {"type": long}, type_pointer=None) == "a" * MAX_TYPE_CHARS
    got = event_type(
        "github", {"x-github-event": "e" * 199}, {"action": "opened"}, type_pointer=None
    )
    assert got == "e" * 199 + "."


def test_rfc6901_examples() -> None:
    # RFC 6901 section 5, verbatim.
    doc = json.loads(
        '{"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3, "g|h": 4, "i\\\\j": 5,'
        ' "k\\"l": 6, " ": 7, "m~n": 8}'
    )
    cases = {
        "": doc,
        "/foo": ["bar", "baz"],
        "/foo/0": "bar",
        "/": 0,
        "/a~1b": 1,
        "/c%d": 2,
        "/e^f": 3,
        "/g|h": 4,
        "/i\\j": 5,
        '/k"l': 6,
        "/ ": 7,
        "/m~0n": 8,
    }
    for pointer, expected in cases.items():
        assert resolve_pointer(doc, pointer) == expected
    for bad in ("foo", "/~2", "/a~", "#/foo"):
        with pytest.raises(ValueError):  # noqa: PT011 - the message names the pointer
            validate_pointer(bad)
    validate_pointer("/deeply/nested/0")
    with pytest.raises(KeyError):
        resolve_pointer(doc, "/foo/2")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    headers=st.dictionaries(
        st.sampled_from(["x-github-event", "x-shopify-topic", "x-other"]), st.text()
    ),
    payload=JSON,
    pointer=st.sampled_from([None, "", "/type", "/a/0", "/event/type"]),
)
def test_event_type_never_raises_on_any_payload(
    scheme: str, headers: dict[str, str], payload: Any, pointer: str | None
) -> None:
    got = event_type(scheme, headers, payload, type_pointer=pointer)
    assert isinstance(got, str)
    assert 1 <= len(got) <= MAX_TYPE_CHARS


# --- parse_json ----------------------------------------------------------------------------------


def test_parse_json() -> None:
    assert parse_json(BODY) == {"id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "type": "invoice.paid"}
    assert parse_json(b"[1, 2.5, null]") == [1, 2.5, None]
    for bad in (b"", b"token=x&team_id=T1", b"[NaN]", b"{'a': 1}", b"\xff", b"[" * 5000):
        with pytest.raises(ValueError, match="not JSON"):
            parse_json(bad)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_parse_json_raises_only_value_error(body: bytes) -> None:
    with contextlib.suppress(ValueError):  # anything else escapes and fails the test
        parse_json(body)


# --- CloudEvents envelope ------------------------------------------------------------------------


def test_to_cloudevent() -> None:
    when = datetime(2026, 5, 1, 12, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
    event = to_cloudevent(
        event_id="01J0ABC",
        source="/v1/sources/src_1",
        type="invoice.paid",
        time=when,
        subject="in_123",
        data={"amount": 4200},
    )
    assert event == {
        "specversion": "1.0",
        "id": "01J0ABC",
        "source": "/v1/sources/src_1",
        "type": "invoice.paid",
        "time": "2026-05-01T10:00:00.250000Z",
        "datacontenttype": "application/json",
        "subject": "in_123",
        "data": {"amount": 4200},
    }
    json.dumps(event)  # the envelope is JSON as it stands


def test_to_cloudevent_binary_data_and_omitted_subject() -> None:
    event = to_cloudevent(
        event_id="e",
        source="s",
        type="slack.command",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        subject=None,
        data=b"token=x&text=hi",
        datacontenttype="application/x-www-form-urlencoded",
    )
    assert "subject" not in event
    assert "data" not in event
    assert event["data_base64"] == "dG9rZW49eCZ0ZXh0PWhp"
    assert event["time"] == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    "overrides",
    [
        {"event_id": ""},
        {"source": ""},
        {"type": ""},
        {"time": datetime(2026, 1, 1)},  # naive on purpose
    ],
)
def test_to_cloudevent_rejects_incomplete_envelopes(overrides: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "event_id": "e",
        "source": "s",
        "type": "t",
        "time": datetime(2026, 1, 1, tzinfo=UTC),
        "subject": None,
        "data": None,
    }
    with pytest.raises(ValueError):  # noqa: PT011 - each attribute has its own message
        to_cloudevent(**(args | overrides))


# --- end to end: verify, then normalize ----------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_verified_request_normalizes(scheme: str) -> None:
    secret = generate_secret(scheme)
    body = b'{"id": "evt_9", "type": "thing.happened", "action": "opened"}'
    headers = sign(scheme, body, secret, now=NOW, msg_id="d-1")
    headers |= {"x-github-event": "issues", "x-shopify-topic": "things/happen"}
    verified = verify(scheme, headers, body, [secret], now=NOW)
    payload = parse_json(body)
    key = dedup_key(scheme, verified, headers, body, payload)
    kind = event_type(scheme, headers, payload, type_pointer="/type")
    expected_key = {"github": "d-1", "standard": "d-1", "stripe": "evt_9"}.get(scheme, _hash(body))
    expected_type = {"github": "issues.opened", "shopify": "things/happen"}.get(
        scheme, "thing.happened"
    )
    assert (key, kind) == (expected_key, expected_type)
    event = to_cloudevent(
        event_id=key,
        source=f"relayport:{scheme}",
        type=kind,
        time=datetime.fromtimestamp(NOW, tz=UTC),
        subject=None,
        data=payload,
    )
    assert event["specversion"] == "1.0"
