"""Inbound → outbound: a source with the `outbound` handler turns each verified inbound event
into a message of its tenant, once, however often its job runs."""

from __future__ import annotations

import httpx
import orjson
import pytest

from relayport.ingest.route_outbound import outbound_type
from tests.conftest import Account
from tests.delivery.conftest import Receiver, create_endpoint, eventually
from tests.ingest.conftest import create_source, deliver, wait_for_job

pytestmark = pytest.mark.usefixtures("worker")


async def test_an_inbound_event_is_sent_out_once(
    client: httpx.AsyncClient, account: Account, receiver: Receiver
) -> None:
    endpoint = await create_endpoint(client, account, receiver.url("/out"))
    source = await create_source(client, account, handler="outbound")
    body = b'{"action": "opened", "number": 7}'
    accepted = await deliver(client, source, body, headers={"X-GitHub-Event": "issues"})
    assert accepted.status_code == 202, accepted.text
    event_id = accepted.json()["event_id"]
    await eventually(lambda: len(receiver.at("/out")) == 1, what="the outbound delivery")
    [got] = receiver.at("/out")
    sent = orjson.loads(got.body)
    assert sent["data"] == {"action": "opened", "number": 7}
    assert got.headers["webhook-id"].startswith("msg_")
    from standardwebhooks.webhooks import Webhook

    Webhook(endpoint["secret"]).verify(got.body, got.headers)
    # Running the job again (a retry, a replay) does not send the event twice.
    job = await wait_for_job(client, account, event_id, "succeeded")
    retried = await client.post(f"/v1/jobs/{job['id']}/retry", headers=account.headers)
    assert retried.status_code == 200, retried.text
    await wait_for_job(client, account, event_id, "succeeded")
    messages = (await client.get("/v1/messages", headers=account.headers)).json()["data"]
    assert len(messages) == 1
    assert messages[0]["event_id"] == f"inbound:{event_id}"
    assert len(receiver.at("/out")) == 1


def test_provider_types_become_outbound_type_names() -> None:
    assert outbound_type("invoice.paid") == "invoice.paid"
    assert outbound_type("issues") == "issues"
    assert outbound_type("app_mention/x y") == "app_mention_x_y"
    assert outbound_type("..a..b..") == "a.b"
    assert outbound_type("") == "event"
