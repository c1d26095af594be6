"""Slack's URL verification handshake: a signed `url_verification` request is answered with its
challenge and stores nothing; an unsigned one is refused like any other delivery."""

from __future__ import annotations

import json

import httpx
from sqlalchemy import func, select

from relayport.core.platform import Platform
from relayport.ingest.models import InboxEvent, Job
from tests.conftest import Account
from tests.core.test_auth import assert_problem
from tests.ingest.conftest import create_source, deliver

# The example from Slack's Events API documentation ("url_verification event").
CHALLENGE = {
    "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
    "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
    "type": "url_verification",
}


async def _count(platform: Platform, model: type[InboxEvent] | type[Job]) -> int:
    async with platform.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_signed_url_verification_is_answered_with_its_challenge(
    client: httpx.AsyncClient, account: Account, platform: Platform
) -> None:
    source = await create_source(client, account, scheme="slack")
    response = await deliver(client, source, json.dumps(CHALLENGE).encode())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"challenge": CHALLENGE["challenge"]}
    assert await _count(platform, InboxEvent) == 0
    assert await _count(platform, Job) == 0
    # An ordinary Slack event on the same source is still stored.
    event = {"type": "event_callback", "team_id": "T1", "event": {"type": "app_mention"}}
    stored = await deliver(client, source, json.dumps(event).encode())
    assert stored.status_code == 202, stored.text
    assert await _count(platform, Job) == 1


async def test_unsigned_url_verification_is_refused(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account, scheme="slack")
    response = await deliver(
        client, source, json.dumps(CHALLENGE).encode(), secret="not-the-secret-at-all-0123456789"
    )
    assert_problem(response, 401, "invalid-signature")


async def test_challenge_on_another_scheme_is_an_ordinary_event(
    client: httpx.AsyncClient, account: Account
) -> None:
    source = await create_source(client, account, scheme="github")
    response = await deliver(
        client, source, json.dumps(CHALLENGE).encode(), headers={"x-github-event": "ping"}
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"
