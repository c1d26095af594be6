"""The GC policy: the started app's objects are frozen once, each occasion once."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from relayport.core import gcpolicy


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gcpolicy, "_frozen", set())
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_started_app_is_frozen_once_and_each_occasion_once(fresh: None) -> None:
    gcpolicy.freeze_started_app()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    gcpolicy.freeze_started_app()  # a second start in the same process changes nothing
    assert gcpolicy.freeze_once("ingest") is True
    assert gcpolicy.freeze_once("ingest") is False
    assert gc.get_freeze_count() >= frozen
