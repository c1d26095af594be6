"""Announcing a committed version with its public event, and applying it without a read.

The pure part (what the announcement holds, and a channel taking it or falling back to the
database) runs on versions built in memory; the end-to-end part runs against real PostgreSQL
and Redis, a real `relayport serve` process and the raw bytes published on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from relayport.configs import documents as docs
from relayport.configs.models import Version
from relayport.configs.push import (
    CHANNEL,
    PUBLISH_HEAD_START_S,
    Channel,
    announce,
    announcement,
    hub_of,
    parse_announcement,
)
from relayport.configs.subscribers import Event, Subscriber
from relayport.configs.versions import Committed, State, meta_of
from relayport.core.crypto import KeyRing
from relayport.core.db import utcnow
from relayport.core.ids import new_id
from relayport.settings import ConfigsSettings, Settings
from tests.configs.conftest import Server, start
from tests.configs.helpers import client_key, env_path, environment, project, put
from tests.conftest import signup

KEYRING = KeyRing({"t1": bytes(range(32))}, "t1")
SECRET = "hunter2-correct-horse"  # a value that must never appear in a Redis message
ENV = "cfe_test"


# --- versions in memory ----------------------------------------------------------------------


def committed(
    previous: Committed | None, full: dict[str, Any], secret_pointers: list[str] | None = None
) -> Committed:
    """The next version after `previous`, as `versions.commit` builds it (no database)."""
    revision = previous.version.revision + 1 if previous else 1
    previous_hash = previous.version.hash if previous else ""
    before = previous.state.secrets if previous else {}
    stored, secrets = docs.split_secrets(full, secret_pointers or [], before)
    version = Version(
        id=new_id("cfv"),
        tenant_id="ten_test",
        environment_id=ENV,
        revision=revision,
        document=stored,
        schemas={},
        secret_pointers=sorted(secrets),
        kind="put",
        changed_keys=sorted(full),
        previous_hash=previous_hash,
        author_type="user",
        author_id="usr_test",
        message="",
        created_at=utcnow(),
        hash="",
    )
    version.hash = docs.version_hash(previous_hash, revision, stored, meta_of(version))
    state = State(revision, version.hash, stored, {}, sorted(secrets), secrets)
    return Committed(version, state, previous.state.stored if previous else {})


def chain(*docs_: dict[str, Any]) -> list[Committed]:
    out: list[Committed] = []
    for doc in docs_:
        out.append(committed(out[-1] if out else None, doc))
    return out


class _QuietPubSub:
    """A pub/sub whose subscription never delivers: the tests feed the channel themselves."""

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield None  # pragma: no cover


class _Hub:
    recent = 8

    class platform:  # what Channel reads of the platform
        pubsub = _QuietPubSub()
        keyring = KEYRING


@pytest.fixture
async def channels() -> AsyncIterator[list[Channel]]:
    made: list[Channel] = []
    yield made
    for channel in made:
        channel.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await channel.task


def new_channel(made: list[Channel]) -> tuple[Channel, Subscriber, Subscriber]:
    """A channel with a public subscriber and a secret reader (counted as `Hub.attach` does)."""
    channel = Channel(_Hub(), "ten_test", ENV)  # type: ignore[arg-type]
    made.append(channel)
    public, secret = Subscriber(False, 100), Subscriber(True, 100)
    channel.subscribers |= {public, secret}
    channel.secret_readers = 1
    return channel, public, secret


def queued(subscriber: Subscriber) -> list[Event]:
    events = list(subscriber._items)
    subscriber._items.clear()
    return events


# --- the announcement ------------------------------------------------------------------------


async def test_announcement_carries_the_public_event_exactly_as_subscribers_get_it(
    channels: list[Channel],
) -> None:
    first, second = chain({"a": 1, "b": [1, 2]}, {"a": 2, "b": [1, 2], "c": {"d": None}})
    by_read, public, secret = new_channel(channels)
    assert by_read.apply(first.version, first.state)
    assert by_read.apply(second.version, second.state)
    events = queued(public)
    secret_events = queued(secret)

    parsed = parse_announcement(announcement(second, 65_536, KEYRING), KEYRING)
    assert parsed is not None
    pointers, payload, event = parsed
    assert pointers == []
    assert payload == events[1].json(False)
    assert event["patch"] == docs.diff(first.state.stored, second.state.stored)
    assert event["previous"] == first.version.hash
    assert event["hash"] == second.version.hash

    # A channel applying the announcements gives byte-identical events for both variants,
    # and the same state (snapshots included) as the one that read the versions.
    by_announcement, public2, secret2 = new_channel(channels)
    assert by_announcement.take(announcement(first, 65_536, KEYRING))
    assert by_announcement.take(announcement(second, 65_536, KEYRING))
    assert [e.payloads for e in queued(public2)] == [e.payloads for e in events]
    assert [e.payloads for e in queued(secret2)] == [e.payloads for e in secret_events]
    assert by_announcement.snapshot().payloads == by_read.snapshot().payloads
    assert (by_announcement.revision, by_announcement.hash) == (2, second.version.hash)


def test_an_announcement_never_holds_a_secret_value() -> None:
    plain = committed(None, {"db": {"host": "h", "password": "old-" + SECRET}}, ["/db/password"])
    rotated = committed(plain, {"db": {"host": "h", "password": SECRET}}, ["/db/password"])
    removed = committed(rotated, {"db": {"host": "h2"}})
    for done in (plain, rotated, removed):
        raw = announcement(done, 65_536, KEYRING)
        assert SECRET.encode() not in raw
        assert b"old-" not in raw
    parsed = parse_announcement(announcement(rotated, 65_536, KEYRING), KEYRING)
    assert parsed is not None
    assert parsed[0] == ["/db/password"]  # where its secrets are, not what they are
    (op,) = parsed[2]["patch"]
    # The new commitment replaces the old one: that is all the patch says of the secret.
    commitment = rotated.state.stored["db"]["password"][docs.SECRET_MARK]
    assert op == {"op": "replace", "path": "/db/password/$secret", "value": commitment}


def test_an_announcement_over_the_limit_is_the_bare_environment_id() -> None:
    (done,) = chain({"big": "x" * 5000})
    assert announcement(done, 4096, KEYRING) == ENV.encode()
    assert parse_announcement(ENV.encode(), KEYRING) is None
    assert len(announcement(done, 65_536, KEYRING)) > 5000


def test_a_change_json_encoders_refuse_is_announced_by_environment_id() -> None:
    first, second = chain({"k": False}, {"k": -(2**63) - 1})  # stored, but past 64 bits
    assert announcement(second, 65_536, KEYRING) == ENV.encode()
    assert parse_announcement(announcement(first, 65_536, KEYRING), KEYRING) is not None


# --- taking it, or falling back to the database -----------------------------------------------


async def test_a_duplicate_announcement_is_taken_once(channels: list[Channel]) -> None:
    first, second = chain({"n": 1}, {"n": 2})
    channel, public, _ = new_channel(channels)
    assert channel.take(announcement(first, 65_536, KEYRING))
    assert channel.take(announcement(second, 65_536, KEYRING))
    assert channel.take(announcement(second, 65_536, KEYRING))  # the echo of one's own commit
    assert channel.take(announcement(first, 65_536, KEYRING))  # a late one
    assert [e.revision for e in queued(public)] == [1, 2]


async def test_a_revision_gap_is_not_skipped_but_left_to_the_database(
    channels: list[Channel],
) -> None:
    first, second, third = chain({"n": 1}, {"n": 2}, {"n": 3})
    channel, public, _ = new_channel(channels)
    assert channel.take(announcement(first, 65_536, KEYRING))
    assert not channel.take(announcement(third, 65_536, KEYRING))  # 2 was never announced here
    assert (channel.revision, [e.revision for e in queued(public)]) == (1, [1])
    # The database read (sync) applies 2 then 3; a late announcement of either is a no-op.
    assert channel.apply(second.version, second.state)
    assert channel.apply(third.version, third.state)
    assert channel.take(announcement(second, 65_536, KEYRING))
    assert channel.take(announcement(third, 65_536, KEYRING))
    assert [e.revision for e in queued(public)] == [2, 3]


async def test_an_announcement_that_does_not_continue_the_chain_is_refused(
    channels: list[Channel],
) -> None:
    first, second = chain({"n": 1}, {"n": 2})
    (other_first,) = chain({"n": 1, "other": True})
    channel, public, _ = new_channel(channels)
    assert channel.take(announcement(other_first, 65_536, KEYRING))
    assert not channel.take(announcement(second, 65_536, KEYRING))  # previous hash differs
    # A patch that does not yield the committed document (hash check) is refused too.
    tampered = orjson.loads(announcement(first, 65_536, KEYRING).split(b"\n", 2)[2])
    tampered["patch"] = [{"op": "add", "path": "/n", "value": 99}]
    fresh, fresh_public, _ = new_channel(channels)
    assert not fresh.take(_signed(b'{"v":1,"pointers":[]}\n' + orjson.dumps(tampered)))
    assert fresh.revision == 0
    assert not queued(fresh_public)
    assert [e.revision for e in queued(public)] == [1]


def _signed(message: bytes, keyring: KeyRing = KEYRING) -> bytes:
    return keyring.sign(message) + b"\n" + message


async def test_an_announcement_not_signed_by_the_key_ring_is_refused(
    channels: list[Channel],
) -> None:
    """Whoever can publish on Redis but holds no master key cannot push a change: a forged,
    altered or unsigned announcement only makes the channel read the database."""
    (first,) = chain({"n": 1})
    genuine = announcement(first, 65_536, KEYRING)
    signature, _, message = genuine.partition(b"\n")
    other = KeyRing({"t1": bytes(32)}, "t1")  # same key id, another key
    altered = message.replace(b'"value":1', b'"value":2')
    assert altered != message
    for forged in (
        message,  # no signature line
        _signed(message, other),
        signature + b"\n" + altered,
        b"nokey:" + signature.partition(b":")[2] + b"\n" + message,
    ):
        channel, public, _ = new_channel(channels)
        assert not channel.take(forged)
        assert channel.revision == 0
        assert not queued(public)
    channel, public, _ = new_channel(channels)
    assert channel.take(genuine)
    assert [e.revision for e in queued(public)] == [1]
    # A key ring that also holds an older key still accepts what that key signed.
    rotated = KeyRing({"t1": bytes(range(32)), "t2": bytes(range(1, 33))}, "t2")
    assert rotated.verify(message, signature)
    assert not rotated.verify(altered, signature)


async def test_versions_with_secrets_are_read_from_the_database_for_a_secret_reader(
    channels: list[Channel],
) -> None:
    plain = committed(None, {"n": 1})
    secret = committed(plain, {"n": 1, "pw": SECRET}, ["/pw"])
    after = committed(secret, {"n": 2, "pw": SECRET}, ["/pw"])
    channel, public, with_secrets = new_channel(channels)
    assert channel.take(announcement(plain, 65_536, KEYRING))
    assert not channel.take(announcement(secret, 65_536, KEYRING))  # the version holds a secret
    assert channel.apply(secret.version, secret.state)  # as the database read does
    assert not channel.take(announcement(after, 65_536, KEYRING))  # the channel's state holds one
    assert channel.apply(after.version, after.state)
    assert [e.revision for e in queued(public)] == [1, 2, 3]
    full = [orjson.loads(e.json(True)) for e in queued(with_secrets)]
    assert full[1]["patch"] == [{"op": "add", "path": "/pw", "value": SECRET}]


async def test_without_a_secret_reader_versions_with_secrets_are_taken_public_only(
    channels: list[Channel],
) -> None:
    plain = committed(None, {"n": 1})
    secret = committed(plain, {"n": 1, "pw": SECRET}, ["/pw"])
    after = committed(secret, {"n": 2, "pw": SECRET}, ["/pw"])
    channel, public, reader = new_channel(channels)
    channel.subscribers.discard(reader)
    channel.secret_readers = 0
    for done in (plain, secret, after):
        assert channel.take(announcement(done, 65_536, KEYRING))
    events = queued(public)
    assert [e.revision for e in events] == [1, 2, 3]
    assert [e.has_full for e in events] == [True, False, False]
    assert (channel.full, channel.pointers) == (None, ["/pw"])  # until `ensure_full`
    # A secret reader joining at revision 1 cannot get deltas without their secret variant:
    # it gets a snapshot (with the values, once `ensure_full` has read them back).
    channel.full = docs.reveal(after.state.stored, after.state.secrets)
    (snapshot,) = channel.catch_up(1, secrets=True)
    assert orjson.loads(snapshot.json(True))["config"] == {"n": 2, "pw": SECRET}
    assert [e.revision for e in channel.catch_up(1)] == [2, 3]  # public readers: deltas
    # An event without its secret variant is never written to a secret reader.
    late = Subscriber(True, 100)
    late.offer(events[1])
    assert late.lost
    assert not queued(late)


async def test_a_bare_or_unknown_announcement_is_left_to_the_database(
    channels: list[Channel],
) -> None:
    channel, public, _ = new_channel(channels)
    bad = (ENV.encode(), b"", b"garbage\n{", b'{"v":2}\n{}', b'{"v":1}\n[]', b'{"v":1}\n{}')
    for message in bad:
        assert not channel.take(message)
    assert channel.revision == 0
    assert not queued(public)


# --- the committing process: publish first, then its own fan-out ---------------------------


class _HeldPubSub(_QuietPubSub):
    """A pub/sub whose PUBLISH completes only when the test says so."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.release = asyncio.Event()

    async def publish(self, channel: str, message: bytes) -> None:
        self.sent.append(message)
        await self.release.wait()


def _committing_process(pubsub: Any) -> tuple[Any, Any]:
    settings = types.SimpleNamespace(
        announce_max_bytes=65_536, recent_versions=8, subscriber_queue=100, gc_freeze_from=0
    )
    platform = types.SimpleNamespace(
        settings=types.SimpleNamespace(configs=settings), pubsub=pubsub, extras={}, keyring=KEYRING
    )
    return platform, types.SimpleNamespace(info={})


async def _local_channel(platform: Any) -> tuple[Channel, Subscriber]:
    hub = hub_of(platform)
    channel = hub.channels[ENV] = Channel(hub, "ten_test", ENV)
    channel.ready.set()
    subscriber = Subscriber(False, 100)
    channel.subscribers.add(subscriber)
    return channel, subscriber


async def test_the_local_fan_out_waits_for_the_publish_to_be_sent() -> None:
    pubsub = _HeldPubSub()
    platform, session = _committing_process(pubsub)
    channel, local = await _local_channel(platform)
    (done,) = chain({"n": 1})
    announce(platform, session, done)
    for callback in session.info["after_commit"]:  # as the request's commit does
        callback()
    await asyncio.sleep(0.001)
    assert pubsub.sent == [announcement(done, 65_536, KEYRING)]
    assert not queued(local)  # the PUBLISH has not been answered yet
    pubsub.release.set()
    await asyncio.sleep(0.001)
    assert [e.revision for e in queued(local)] == [1]
    assert channel.take(pubsub.sent[0])  # its own echo: nothing twice
    assert not queued(local)
    channel.task.cancel()


async def test_a_redis_that_does_not_answer_delays_the_local_fan_out_only_briefly() -> None:
    pubsub = _HeldPubSub()  # never released
    platform, session = _committing_process(pubsub)
    channel, local = await _local_channel(platform)
    (done,) = chain({"n": 1})
    announce(platform, session, done)
    for callback in session.info["after_commit"]:
        callback()
    await asyncio.sleep(PUBLISH_HEAD_START_S * 4)
    assert [e.revision for e in queued(local)] == [1]
    channel.task.cancel()
    for task in list(hub_of(platform)._tasks):
        task.cancel()


# --- end to end: real PostgreSQL, Redis and a second process ---------------------------------


@contextlib.asynccontextmanager
async def _raw_redis_messages(url: str, pattern: str) -> AsyncIterator[list[bytes]]:
    """Every message published on channels matching `pattern`, as raw bytes."""
    redis = Redis.from_url(url)
    listener = redis.pubsub()
    await listener.psubscribe(pattern)
    confirmed = None
    while confirmed is None or confirmed["type"] != "psubscribe":  # live from here on
        confirmed = await listener.get_message(timeout=5.0)
    got: list[bytes] = []

    async def read() -> None:
        while True:
            message = await listener.get_message(timeout=1.0)
            if message and message["type"] == "pmessage":
                got.append(bytes(message["data"]))

    reader = asyncio.create_task(read())
    try:
        yield got
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await listener.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def _events(ws: Any, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < count:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] != "heartbeat":
            out.append(message)
    return out


async def _more(ws: Any, seconds: float) -> list[dict[str, Any]]:
    """What else (heartbeats aside) arrives within `seconds`."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                message = json.loads(await ws.recv())
                if message["type"] != "heartbeat":
                    out.append(message)
    return out


@pytest.mark.parametrize("backend", ["postgres"])
async def test_announced_versions_reach_another_process_once_in_order_without_secrets_in_redis(
    backend: str, servers: list[Server], settings_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """Writer: an app in this process; reader: a `relayport serve` process. Covers the
    announced path, a lost announcement (a gap), a change too large to announce, versions
    holding secrets taken while no secret reader is there, and a secret reader joining later
    (the values read back from the database) after which such versions are read."""
    limit = 2048
    reader = start(settings_kwargs, tmp_path, RELAYPORT_CONFIGS__ANNOUNCE_MAX_BYTES=str(limit))
    servers.append(reader)
    settings = Settings(**settings_kwargs, configs=ConfigsSettings(announce_max_bytes=limit))
    from relayport.app import create_app

    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
    pattern = f"{settings.redis_key_prefix}ps:{CHANNEL}*"
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as http,
        _raw_redis_messages(str(settings.redis_url), pattern) as raw,
    ):
        account = await signup(http)
        pid = await project(http, account)
        base = env_path(pid, await environment(http, account, pid, "prod"))
        public_key = await client_key(http, account, base)
        secret_key = await client_key(http, account, base, secrets=True)

        async def write(key: str, body: dict[str, Any]) -> None:
            assert (await put(http, account, base, key, body)).status_code == 200

        def connect(key: str, since: int) -> Any:
            url = f"{reader.ws}/v1/client/stream?since={since}"
            return websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"})

        await write("n", {"value": 1})  # r1
        async with connect(public_key, 1) as public:
            # Attached (nothing to catch up on): a heartbeat proves it.
            assert json.loads(await asyncio.wait_for(public.recv(), 10))["type"] == "heartbeat"
            await write("n", {"value": 2})  # r2
            # r3 is committed but its announcement is lost; r4's announcement shows the gap.
            pubsub = app.state.platform.pubsub
            publish = pubsub.publish

            async def lost(channel: str, message: bytes) -> None:
                pass

            pubsub.publish = lost
            await write("n", {"value": 3})
            pubsub.publish = publish
            await write("n", {"value": 4})
            big = "y" * (2 * limit)
            await write("big", {"value": big})  # r5: announced by id only
            got = await _events(public, 4)  # the reader's reads are done: r6 and r7 are taken
            await write("pw", {"value": SECRET, "schema": {"type": "string", "x-secret": True}})
            await write("n", {"value": 7})  # r7
            got += await _events(public, 2)

            # A secret reader joins at r4: r6 and r7 were applied without their secret
            # variant, so it gets a snapshot, its values read back from the database.
            async with connect(secret_key, 4) as secret:
                (snapshot,) = await _events(secret, 1)
                await write("n", {"value": 8})  # r8: read from the database (a secret reader)
                got_secret = await _events(secret, 1)
                got += await _events(public, 1)
                for ws in (public, secret):  # anything sent twice would follow at once
                    assert await _more(ws, 0.5) == []

        assert [m["revision"] for m in got] == [2, 3, 4, 5, 6, 7, 8]
        for before, after in itertools.pairwise(got):  # the hash chain continues
            assert after["previous"] == before["hash"]
        assert got[3]["patch"] == [{"op": "add", "path": "/big", "value": big}]
        assert SECRET not in json.dumps(got)
        assert (snapshot["type"], snapshot["revision"]) == ("snapshot", 7)
        assert snapshot["config"] == {"n": 7, "big": big, "pw": SECRET}
        assert got_secret[0]["revision"] == 8
        assert got_secret[0]["patch"] == [{"op": "replace", "path": "/n", "value": 8}]
        assert got_secret[0]["previous"] == snapshot["hash"]

        # On Redis: r1, r2, r4, r6, r7 and r8 carried their public event (r6 on, with where
        # its secret is); r5 was too large (the bare id); r3 was never published. No secret
        # value in any raw message.
        deadline = asyncio.get_running_loop().time() + 5
        while len(raw) < 7 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert not any(SECRET.encode() in message for message in raw)
        keyring = app.state.platform.keyring
        announced = [parse_announcement(message, keyring) for message in raw]
        assert [a[2]["revision"] if a else None for a in announced] == [1, 2, 4, None, 6, 7, 8]
        assert raw[3] == base.rsplit("/", 1)[1].encode()
        assert [a[0] if a else None for a in announced] == [[], [], [], None, *[["/pw"]] * 3]
        assert all(len(message) <= limit for message in raw)
