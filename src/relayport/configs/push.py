"""Live push: one hub per process fans each new version out to its local subscribers.

A commit announces the version on the platform pub/sub (Redis when scaled out) after the
transaction commits, with its public event: the patch subscribers without secret access get,
secrets only as commitments (`announcement`). A process with subscribers for that environment
applies the announced event without a database read when it continues its head and no secret
is involved (`Channel.take`); otherwise it reads the new versions from the database once
(secret values never travel through Redis), encodes each event once per variant (with or
without secret values) and hands the same bytes to every subscriber.

Ordering and gaps: a channel applies versions strictly in revision order; an announcement that
does not continue its head (a gap) makes it read every version after the last one it applied,
so an announcement that arrives late, twice or never (a lost publish is caught by the next
announcement or the periodic sync) leaves no subscriber on a gap. A subscriber is attached
and its catch-up computed in one synchronous step, after the channel's pub/sub subscription is
live and its state loaded: every later version reaches its queue, none twice.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from relayport.configs import documents as docs
from relayport.configs.models import Version
from relayport.configs.repository import (
    ClientKeyRepository,
    ClientRepository,
    EnvironmentRepository,
    VersionRepository,
)
from relayport.configs.subscribers import SUBSCRIBERS, Event, Subscriber
from relayport.configs.versions import Committed, State, meta_of, state_from
from relayport.core.crypto import KeyRing
from relayport.core.db import utcnow
from relayport.core.deps import after_commit
from relayport.core.platform import Platform
from relayport.core.pubsub import PubSubError, SubscriptionLost

log = logging.getLogger("relayport.configs")
HUB = "configs.hub"
CHANNEL = "configs.env."
HEARTBEAT_SLICE = 500
CONFIRM_SLICE = 400  # (key, name) pairs per UPDATE: under SQLite's bound-parameter limit
# The longest the committing process's own subscribers wait for its PUBLISH (see `announce`).
PUBLISH_HEAD_START_S = 0.005


class Channel:
    """The subscribers of one environment in this process and its recent versions."""

    def __init__(self, hub: Hub, tenant_id: str, env_id: str) -> None:
        self.hub = hub
        self.tenant_id = tenant_id
        self.env_id = env_id
        self.subscribers: set[Subscriber] = set()
        self.revision = 0
        self.hash = ""
        self.stored: dict[str, Any] = {}
        # The document with secret values; None when announcements without them were applied
        # while no subscriber here could read secrets (`ensure_full` reads it back).
        self.full: dict[str, Any] | None = {}
        self.pointers: list[str] = []
        # Subscribers reading secrets, attached or attaching: while there are any, versions
        # that involve secrets are read from the database (announcements carry no values).
        self.secret_readers = 0
        self.previous = ""
        self.meta = ""
        self.recent: deque[Event] = deque(maxlen=hub.recent)
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self._lock = asyncio.Lock()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        pubsub = self.hub.platform.pubsub
        while True:
            try:
                async with pubsub.subscribe(CHANNEL + self.env_id) as subscription:
                    await self.sync()  # after the subscription is live: nothing falls between
                    self.ready.set()
                    async for message in subscription:
                        if not self.take(message):
                            await self.sync()
                return  # pub/sub closed: the process is stopping
            except (SubscriptionLost, PubSubError) as exc:
                log.warning(
                    "config channel resubscribing",
                    extra={"event": "configs.resubscribe", "environment": self.env_id},
                )
                if not self.ready.is_set():
                    self.failed = exc
                    self.ready.set()
                    return
                await asyncio.sleep(0.2)

    async def sync(self) -> None:
        """Apply every committed version after the last applied one, in order.

        On an autocommit read session: versions are append-only and chained by revision, so
        the reads need no snapshot of their own, and a transaction would add its BEGIN and
        COMMIT round trips to the latency of every announced change."""
        async with self._lock, self.hub.platform.db.reads() as session:
            await self._sync(session)

    async def _sync(self, session: AsyncSession) -> None:
        keyring = self.hub.platform.keyring
        versions = VersionRepository(session, self.tenant_id)
        if self.revision == 0 and not self.ready.is_set():
            env = await EnvironmentRepository(session, self.tenant_id).find(self.env_id)
            head = env.revision if env else 0
            # Start far enough back to fill the buffer for reconnects with a delta.
            self.revision = max(0, head - self.hub.recent)
            if self.revision:
                start = await versions.at(self.env_id, self.revision)
                if start is not None:
                    state = await state_from(session, keyring, start, with_secrets=True)
                    self.hash, self.stored, self.full = state.hash, state.stored, state.full()
                    self.pointers = state.pointers
                    self.previous, self.meta = start.previous_hash, meta_of(start)
        for version in await versions.between(self.env_id, self.revision, 2**31 - 1):
            if version.revision != self.revision + 1:
                continue  # applied meanwhile by the local fast path
            state = await state_from(session, keyring, version, with_secrets=True)
            self.apply(version, state)

    def apply(self, version: Version, state: State) -> bool:
        """Fan out `version` if it is the next one; False (and nothing done) otherwise."""
        if version.revision != self.revision + 1:
            return False
        full = state.full()
        known = self.full  # None: not known here (see `take`); the event has no secret variant
        base = {
            "type": "patch",
            "revision": version.revision,
            "hash": version.hash,
            "previous": version.previous_hash,
            "meta": meta_of(version),
        }
        commitments = docs.commitments_of(state.stored)
        event = Event(
            "patch",
            version.revision,
            base | {"patch": docs.diff(self.stored, state.stored)},
            None
            if known is None
            else base | {"patch": docs.diff(known, full), "commitments": commitments},
        )
        self.revision, self.hash = version.revision, version.hash
        self.stored, self.full, self.pointers = state.stored, full, state.pointers
        self.previous, self.meta = version.previous_hash, str(base["meta"])
        self._fan_out(event)
        return True

    def take(self, message: bytes) -> bool:
        """Apply an announced version from the announcement itself, without a database read.

        True when the channel has the announced version now (applied here, or already
        before: the committing process's own echo, a duplicate); False when it must read the
        database instead: a bare announcement (the change was too large to carry, or came
        from an older process), a gap (a revision in between was not applied here yet), a
        chain that does not continue this channel's head, or secrets while a subscriber here
        reads them (the announcement carries only the public form; the secret values a
        client key with secret access gets are read from the database, never carried
        through Redis). With secrets and no such subscriber, the version is applied without
        its secret variant and the channel forgets its full document until one attaches.

        Synchronous: it applies the version in one step, so a concurrent `sync` (which
        re-checks the revision before each apply) and the local fast path cannot apply it
        twice or out of order.
        """
        announced = parse_announcement(message, self.hub.platform.keyring)
        if announced is None:
            return False
        pointers, payload, event = announced
        revision = event["revision"]
        if revision <= self.revision:
            return True  # already applied: nothing twice
        if revision != self.revision + 1 or event["previous"] != self.hash:
            return False  # a gap, or not this channel's chain: read what is missing
        secret = bool(pointers) or bool(self.pointers)
        if secret and self.secret_readers:
            return False
        try:
            stored = docs.apply_patch(self.stored, event["patch"])
            checked = docs.version_hash(self.hash, revision, stored, event["meta"])
        except (docs.PatchFailed, ValueError, TypeError):
            return False
        if checked != event["hash"]:
            return False  # the patch does not give the committed document: trust the database
        # Without secrets the full form is the stored form (as `reveal` with no secrets gives),
        # so the variant for secret-reading keys is the same patch with its commitments. With
        # secrets nobody here may read them: no secret variant, and the full document is
        # unknown until `ensure_full` reads it.
        full = (
            None if secret else orjson.dumps(event | {"commitments": docs.commitments_of(stored)})
        )
        self.revision, self.hash = revision, event["hash"]
        self.stored = stored
        self.full = None if secret else stored
        self.pointers = pointers
        self.previous, self.meta = event["previous"], event["meta"]
        self._fan_out(Event.encoded("patch", revision, payload, full))
        return True

    def _fan_out(self, event: Event) -> None:
        self.recent.append(event)
        for subscriber in tuple(self.subscribers):
            subscriber.offer(event)

    async def ensure_full(self) -> None:
        """Read back the full document (secret values) when announcements left it unknown.

        Called by an attaching secret reader, already counted in `secret_readers`, so no
        announcement can make it unknown again meanwhile."""
        while self.full is None:
            async with self._lock, self.hub.platform.db.reads() as session:
                revision = self.revision
                if self.full is not None:
                    return
                version = await VersionRepository(session, self.tenant_id).at(self.env_id, revision)
                if version is None:  # versions are append-only: only a broken database
                    raise PubSubError(f"revision {revision} of {self.env_id} is missing")
                keyring = self.hub.platform.keyring
                state = await state_from(session, keyring, version, with_secrets=True)
                if self.revision == revision and self.full is None:
                    self.full = state.full()

    def snapshot(self) -> Event:
        base = {
            "type": "snapshot",
            "revision": self.revision,
            "hash": self.hash,
            "previous": self.previous,
            "meta": self.meta,
        }
        full = self.full
        return Event(
            "snapshot",
            self.revision,
            base | {"config": self.stored},
            None
            if full is None
            else base | {"config": full, "commitments": docs.commitments_of(self.stored)},
        )

    def catch_up(self, since: int | None, secrets: bool = False) -> list[Event]:
        """What a client at `since` needs: nothing, the missed deltas, or a snapshot (also
        for a secret reader when a delta it needs was applied without its secret variant)."""
        if not since:  # a client with nothing gets the whole state, even an empty one
            return [self.snapshot()]
        if since == self.revision:
            return []
        oldest = self.recent[0].revision if self.recent else self.revision + 1
        if oldest - 1 <= since < self.revision:
            missed = [e for e in self.recent if e.revision > since]
            if not secrets or all(e.has_full for e in missed):
                return missed
        return [self.snapshot()]


class Hub:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        settings = platform.settings.configs
        self.recent = settings.recent_versions
        self.bound = settings.subscriber_queue
        self.channels: dict[str, Channel] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.count = 0  # subscribers in this process
        self.frozen_at = 0

    async def attach(
        self,
        tenant_id: str,
        env_id: str,
        *,
        secrets: bool,
        since: int | None,
        key_id: str | None = None,
        name: str | None = None,
    ) -> tuple[Channel, Subscriber, list[Event]]:
        channel = self.channels.get(env_id)
        if channel is None or channel.task.done():
            channel = self.channels[env_id] = Channel(self, tenant_id, env_id)
        channel.secret_readers += secrets  # from now on, versions with secrets are read
        try:
            await channel.ready.wait()
            if channel.failed is not None:
                if self.channels.get(env_id) is channel:
                    del self.channels[env_id]
                raise PubSubError("live configuration is unavailable") from channel.failed
            if since is not None and since > channel.revision:
                # The client saw a version this process has not applied yet (it was announced
                # elsewhere first): catch up rather than send it an older snapshot.
                await channel.sync()
            if secrets:
                await channel.ensure_full()
        except BaseException:
            channel.secret_readers -= secrets
            raise
        if self.channels.get(env_id) is not channel:  # its last subscriber left meanwhile
            channel.secret_readers -= secrets
            return await self.attach(
                tenant_id, env_id, secrets=secrets, since=since, key_id=key_id, name=name
            )
        self._ensure_ticker()
        # No await from here to the return: attach and catch-up see the same channel state.
        subscriber = Subscriber(secrets, self.bound, key_id, name)
        channel.subscribers.add(subscriber)
        SUBSCRIBERS.inc()
        self.count += 1
        self._gc_freeze()
        return channel, subscriber, channel.catch_up(since, secrets)

    def detach(self, channel: Channel, subscriber: Subscriber) -> None:
        if subscriber in channel.subscribers:
            channel.subscribers.discard(subscriber)
            channel.secret_readers -= subscriber.secrets
            SUBSCRIBERS.dec()
            self.count -= 1
            if self.frozen_at and self.count < self.frozen_at // 2:
                # Half of what was frozen is gone: collect the closed connections' cycles
                # now, then freeze what lives on again. Unfreezing alone would also hand the
                # rest of the process (the app's objects other modules froze, e.g. ingest's
                # freeze at its first delivery) back to every full collection.
                gc.unfreeze()
                gc.collect()
                gc.freeze()
                threshold = self.platform.settings.configs.gc_freeze_from
                self.frozen_at = self.count if threshold and self.count >= threshold else 0
        if not channel.subscribers and self.channels.get(channel.env_id) is channel:
            del self.channels[channel.env_id]
            channel.task.cancel()

    def _gc_freeze(self) -> None:
        """Exclude long-lived connection objects from the cyclic GC as subscribers pile up.

        Measured with 10,000 WebSocket subscribers: a full collection walks every connection's
        objects and stopped the loop for 0.7-1.7 s, the whole p99 tail. `gc.freeze()` moves
        what exists now out of the collector's reach; done at each doubling from
        `gc_freeze_from` subscribers, so its cost (and what it may keep) stays bounded.
        """
        threshold = self.platform.settings.configs.gc_freeze_from
        if threshold and self.count >= max(threshold, 2 * self.frozen_at):
            gc.freeze()
            self.frozen_at = self.count

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Every interval: sync each channel (bounding the delay of a lost announcement), then
        one shared heartbeat event to all its subscribers."""
        interval = self.platform.settings.configs.heartbeat_interval_s
        while self.channels:
            await asyncio.sleep(interval)
            for channel in list(self.channels.values()):
                try:
                    await channel.sync()
                    await self._drop_revoked(channel)
                    await self._confirm_connected(channel)
                except Exception:  # the next tick retries; a stream must not die of it
                    log.exception("config sync failed", extra={"event": "configs.sync_failed"})
                beat = {"type": "heartbeat", "revision": channel.revision}
                heartbeat = Event("heartbeat", channel.revision, beat, beat)
                # Only subscribers that got nothing since the last tick, and in slices: 10,000
                # heartbeats queued at once would delay a change arriving meanwhile.
                idle = [s for s in channel.subscribers if not s.active]
                for subscriber in channel.subscribers:
                    subscriber.active = False
                for start in range(0, len(idle), HEARTBEAT_SLICE):
                    for subscriber in idle[start : start + HEARTBEAT_SLICE]:
                        subscriber.offer(heartbeat)
                    await asyncio.sleep(0.01)

    async def _drop_revoked(self, channel: Channel) -> None:
        """End the streams of client keys revoked on another instance (one query per tick)."""
        keys = {s.key_id for s in channel.subscribers if s.key_id}
        if not keys:
            return
        async with self.platform.db.sessions() as session:
            revoked = await ClientKeyRepository(session, channel.tenant_id).revoked_among(keys)
        for key_id in revoked:
            self.revoke(key_id)

    async def _confirm_connected(self, channel: Channel) -> None:
        """Refresh `last_seen_at` of the named clients streaming from this process, so a
        client whose instance died (and never marked it disconnected) stops counting as
        connected after a few intervals."""
        named = sorted({(s.key_id, s.name) for s in channel.subscribers if s.key_id and s.name})
        if not named:
            return
        now = utcnow()
        async with self.platform.db.transaction() as session:
            repo = ClientRepository(session, channel.tenant_id)
            for start in range(0, len(named), CONFIRM_SLICE):
                await repo.touch(channel.env_id, named[start : start + CONFIRM_SLICE], now)

    def revoke(self, key_id: str) -> None:
        """End every stream of this client key in this process now."""
        for channel in list(self.channels.values()):
            for subscriber in tuple(channel.subscribers):
                if subscriber.key_id == key_id:
                    subscriber.drop()

    def watch(self, app: Any) -> None:
        """End every stream once the app starts draining, so shutdown does not wait on them."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(app))

    async def _watch(self, app: Any) -> None:
        # The lifespan only flips a flag when draining starts; polling it from one task per
        # process is cheaper than waking every stream.
        while not app.state.draining:  # noqa: ASYNC110
            await asyncio.sleep(0.25)
        for channel in list(self.channels.values()):
            for subscriber in tuple(channel.subscribers):
                subscriber.drop()

    def spawn(self, work: Callable[[], Any]) -> None:
        task = asyncio.get_running_loop().create_task(work())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def hub_of(platform: Platform) -> Hub:
    hub = platform.extras.get(HUB)
    if hub is None:
        hub = platform.extras[HUB] = Hub(platform)
    return hub


def announcement(done: Committed, max_bytes: int, keyring: KeyRing) -> bytes:
    """The pub/sub message announcing a committed version: a header line, then the public
    event (JSON: revision, hash, previous, meta and the JSON Patch of the stored form, where
    secrets are commitments), exactly the payload subscribers without secret access get.

    It never holds a secret value: the patch is computed between stored documents, in which
    every secret is replaced by its commitment. Over `max_bytes` the announcement is the bare
    environment id, and other processes read the version from the database.

    A first line signs the rest with the key ring (`KeyRing.sign`): whoever can publish on
    Redis without holding a master key cannot push a change to subscribers; an announcement
    whose signature fails only makes the other processes read the database.
    """
    version = done.version
    event = {
        "type": "patch",
        "revision": version.revision,
        "hash": version.hash,
        "previous": version.previous_hash,
        "meta": meta_of(version),
        "patch": docs.diff(done.previous_stored, done.state.stored),
    }
    # The pointers say where the version's secrets are (their paths, never their values).
    header = {"v": 1, "env": version.environment_id, "pointers": list(version.secret_pointers)}
    bare = version.environment_id.encode()
    try:
        message = orjson.dumps(header) + b"\n" + orjson.dumps(event)
    except orjson.JSONEncodeError:  # e.g. an integer past 64 bits: let readers decide
        return bare
    signed = keyring.sign(message) + b"\n" + message
    return signed if len(signed) <= max_bytes else bare


def parse_announcement(
    message: bytes, keyring: KeyRing
) -> tuple[list[str], bytes, dict[str, Any]] | None:
    """(the version's secret pointers, the public payload, the payload parsed), or None for a
    bare announcement, one whose signature fails, or one this process does not understand."""
    signature, newline, signed = message.partition(b"\n")
    if not newline or not keyring.verify(signed, signature):
        return None
    head, newline, payload = signed.partition(b"\n")
    if not newline:
        return None
    try:
        header, event = orjson.loads(head), orjson.loads(payload)
        if header.get("v") != 1 or event.get("type") != "patch":
            return None
        if not isinstance(event.get("revision"), int) or not isinstance(event.get("patch"), list):
            return None
        if not all(isinstance(event.get(k), str) for k in ("hash", "previous", "meta")):
            return None
        pointers = header["pointers"]
        if not isinstance(pointers, list) or not all(isinstance(p, str) for p in pointers):
            return None
    except (orjson.JSONDecodeError, AttributeError, KeyError):
        return None
    return pointers, payload, event


def announce(platform: Platform, session: AsyncSession, done: Committed) -> None:
    """After the request's transaction commits: publish the announcement (with the public
    event, see `announcement`) so other processes apply the version, then hand it to this
    process's channel (no database read: the common single-instance case).

    The local fan-out waits for the PUBLISH to be sent. Queued beside the publish's task, it
    ran first: redis-py yields inside `publish` before it writes the command, so the PUBLISH
    left only after this process's whole fan-out (measured with two processes: the p50 of the
    other one's subscribers 8 ms later at 1,000 subscribers, 67 ms at 10,000). Awaiting the reply
    costs the local subscribers one Redis round trip; a Redis that does not answer within
    `PUBLISH_HEAD_START_S` does not hold them longer."""
    env_id = done.version.environment_id
    message = announcement(done, platform.settings.configs.announce_max_bytes, platform.keyring)

    def publish() -> None:
        hub = hub_of(platform)
        applied = False

        def apply_here() -> None:
            nonlocal applied
            if applied:
                return
            applied = True
            channel = hub.channels.get(env_id)
            if channel is not None and channel.ready.is_set():
                channel.apply(done.version, done.state)

        async def run() -> None:
            timer = asyncio.get_running_loop().call_later(PUBLISH_HEAD_START_S, apply_here)
            try:
                await platform.pubsub.publish(CHANNEL + env_id, message)
            except PubSubError:  # subscribers catch up at the next periodic sync
                log.warning("config announce failed", extra={"event": "configs.announce_failed"})
            finally:
                timer.cancel()
                apply_here()

        hub.spawn(run)

    after_commit(session, publish)
