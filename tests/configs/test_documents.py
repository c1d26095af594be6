"""Pure document logic: canonical JSON, secrets split/reveal, patches, the hub's queues."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayport.configs import documents as docs
from relayport.configs.subscribers import Event, Subscriber
from relayport.core.pubsub import SubscriptionLost

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values, json_values)
@settings(max_examples=200, deadline=None)
def test_diff_then_apply_gives_the_new_document(old: Any, new: Any) -> None:
    assert docs.apply_patch(old, docs.diff(old, new)) == new


@given(st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=4))
@settings(max_examples=200, deadline=None)
def test_any_patch_input_applies_or_fails_as_patch_failed(ops: Any) -> None:
    # Anything else (KeyError, TypeError...) would escape and fail the test: a 500 in the API.
    with contextlib.suppress(docs.PatchFailed):
        docs.apply_patch({"a": [1, {"b": 2}]}, ops)


@given(json_values)
def test_canonical_json_is_independent_of_key_order(value: Any) -> None:
    if isinstance(value, dict):
        reordered = dict(reversed(list(value.items())))
        assert docs.canonical(reordered) == docs.canonical(value)


SCHEMA = {
    "type": "object",
    "properties": {
        "password": {"type": "string", "x-secret": True},
        "replicas": {"type": "array", "items": {"$ref": "#/$defs/replica"}},
    },
    "$defs": {"replica": {"type": "object", "properties": {"token": {"writeOnly": True}}}},
}


def test_secret_pointers_follow_properties_items_and_refs() -> None:
    value = {"password": "p", "replicas": [{"token": "t1"}, {"token": "t2", "x": 1}], "o": 1}
    assert docs.secret_pointers(SCHEMA, value) == [
        "/password",
        "/replicas/0/token",
        "/replicas/1/token",
    ]


@given(st.text(min_size=1), st.text(min_size=1))
def test_split_and_reveal_round_trip_and_hide_every_secret(password: str, token: str) -> None:
    doc = {"db": {"password": password, "replicas": [{"token": token}]}}
    pointers = ["/db" + p for p in docs.secret_pointers(SCHEMA, doc["db"])]
    stored, secrets = docs.split_secrets(doc, pointers)
    assert docs.reveal(stored, secrets) == doc
    assert set(docs.commitments_of(stored)) == set(pointers)
    assert docs.redact_like(doc, docs.commitments_of(stored)) == stored
    again, _ = docs.split_secrets(doc, pointers, secrets)
    assert again == stored  # unchanged secrets keep their commitments


def test_schema_errors_and_violations_carry_pointers() -> None:
    assert docs.schema_errors({"type": 5})
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]}
    assert docs.schema_errors(draft7) == []
    assert [v["pointer"] for v in docs.violations(draft7, [1])] == ["/0"]


async def test_a_slow_subscriber_is_dropped_and_others_keep_receiving() -> None:
    slow, fast = Subscriber(False, bound=3), Subscriber(False, bound=3)
    received: list[int] = []
    for revision in range(1, 11):
        event = Event("patch", revision, {"revision": revision}, {"revision": revision})
        slow.offer(event)
        fast.offer(event)
        received += [e.revision for e in await fast.next()]
    assert received == list(range(1, 11))
    with pytest.raises(SubscriptionLost):
        await slow.next()


def test_one_encoding_is_shared_by_every_subscriber() -> None:
    event = Event("patch", 7, {"a": 1}, {"a": 2})
    assert event.sse(False) == b'id: 7\nevent: patch\ndata: {"a":1}\n\n'
    assert event.sse(False) is event.sse(False)
    assert event.text(True) is event.text(True)
    assert event.text(True) == '{"a":2}'
