"""The live-configuration client: state, verification, cache file, connection loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import websockets
from websockets.exceptions import InvalidHandshake, InvalidMessage, InvalidStatus

from relayport.configs import documents as docs

log = logging.getLogger("relayport.client")
Callback = Callable[[dict[str, Any], dict[str, Any], int], Any]
Transport = Literal["auto", "websocket", "sse"]
# Refusals that say "no WebSocket here" (a proxy without upgrades, a server without WebSocket
# support), as opposed to "not you" (401/403) or "not now" (429, 5xx): fall back to SSE.
_NO_WEBSOCKET = {200, 204, 304, 400, 404, 405, 426, 501}


class _Resync(Exception):
    """The server ended the stream and asks for a reconnect (SSE `resync`)."""


class ChainError(Exception):
    """A received version whose hash or link to the previous version does not check out."""


@dataclass(frozen=True)
class Snapshot:
    revision: int = 0
    hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    commitments: dict[str, str] = field(default_factory=dict)
    previous: str = ""
    meta: str = ""


def verify(
    previous: str, revision: int, config: Any, commitments: dict[str, str], meta: str, claimed: str
) -> None:
    """Recompute a version's hash from what the client holds; raise `ChainError` if it differs.

    A client without secret access holds the commitments themselves; one with access holds
    the values and gets the commitments beside them, so both hash the same stored form.
    """
    stored = docs.redact_like(config, commitments) if commitments else config
    if docs.version_hash(previous, revision, stored, meta) != claimed:
        raise ChainError(f"revision {revision}: hash does not match its content")


def apply_message(current: Snapshot, message: dict[str, Any]) -> Snapshot:
    """The state after one stream message (snapshot or patch), verified."""
    revision = int(message["revision"])
    commitments = dict(message.get("commitments") or {})
    if message["type"] == "snapshot":
        config = message["config"]
    else:
        if revision != current.revision + 1 or message["previous"] != current.hash:
            raise ChainError(
                f"revision {revision} does not follow {current.revision} (previous hash differs)"
            )
        config = docs.apply_patch(current.config, message["patch"])
    verify(message["previous"], revision, config, commitments, message["meta"], message["hash"])
    return Snapshot(
        revision, message["hash"], config, commitments, message["previous"], message["meta"]
    )


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


class AsyncConfigClient:
    def __init__(
        self,
        url: str,
        key: str,
        *,
        name: str | None = None,
        cache_path: str | os.PathLike[str] | None = None,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 30.0,
        transport: Transport = "auto",
    ) -> None:
        """`transport`: "websocket", "sse", or "auto" (WebSocket, and Server-Sent Events from
        the first handshake that shows WebSocket is unavailable on the way to the server)."""
        if transport not in ("auto", "websocket", "sse"):
            raise ValueError(f"unknown transport {transport!r}")
        self.url = url.rstrip("/")
        self.transport: Transport = transport
        self._key = key
        self.name = name
        self.cache_path = Path(cache_path) if cache_path else None
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.snapshot = Snapshot()
        self.connected = asyncio.Event()
        self._callbacks: list[Callback] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0
        self._load_cache()
        self._applied = self.snapshot.revision

    # --- reading ------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self.snapshot.revision

    @property
    def config(self) -> dict[str, Any]:
        return self.snapshot.config

    def get(self, key: str, default: Any = None) -> Any:
        return self.snapshot.config.get(key, default)

    def on_change(self, callback: Callback) -> None:
        """Call `callback(old_config, new_config, revision)` after each applied revision."""
        self._callbacks.append(callback)

    async def wait_for(self, revision: int, timeout_s: float = 10.0) -> None:
        """Wait until the client has applied `revision` (or a later one)."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self._applied >= revision)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> AsyncConfigClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the connection -----------------------------------------------------------------

    def _stream_url(self, websocket: bool = True) -> str:
        parts = urlsplit(self.url)
        scheme = parts.scheme
        if websocket:
            scheme = "wss" if parts.scheme == "https" else "ws"
        query: dict[str, str | int] = {"since": self.snapshot.revision}
        if self.name:
            query["client"] = self.name
        return urlunsplit((scheme, parts.netloc, parts.path + "/v1/client/stream",
                           urlencode(query), ""))  # fmt: skip

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                if self.transport == "sse":
                    await self._sse()
                else:
                    await self._websocket()
                attempt = 0  # the server ended a working stream: reconnect at once-ish
            except asyncio.CancelledError:
                raise
            except ChainError as exc:
                # Resync from scratch: the next connection asks for a snapshot.
                log.warning("config chain broken, resyncing: %s", exc)
                self.snapshot = Snapshot()
                self._applied = 0
            except InvalidStatus as exc:
                status = exc.response.status_code
                if self.transport == "auto" and status in _NO_WEBSOCKET:
                    log.info("WebSocket refused (%s): using Server-Sent Events", status)
                    self.transport = "sse"
                    continue
                log.info("config stream refused: %s", status)
            except (InvalidHandshake, InvalidMessage) as exc:
                if self.transport == "auto":
                    log.info("WebSocket unavailable (%s): using Server-Sent Events",
                             type(exc).__name__)  # fmt: skip
                    self.transport = "sse"
                    continue
                log.info("config stream lost: %s", type(exc).__name__)
            except (OSError, websockets.WebSocketException, httpx.HTTPError, _Resync,
                    ValueError, KeyError) as exc:  # fmt: skip
                log.info("config stream lost: %s", type(exc).__name__)
            self.connected.clear()
            self.reconnects += 1
            await asyncio.sleep(backoff(attempt, self.backoff_base_s, self.backoff_max_s))
            attempt += 1

    async def _websocket(self) -> None:
        async with websockets.connect(
            self._stream_url(),
            additional_headers=self._auth,
            open_timeout=10,
            max_size=16 * 2**20,
        ) as ws:
            self.connected.set()
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") in ("snapshot", "patch"):
                    await self._apply(message)
                    await ws.send(json.dumps({"type": "ack", "revision": self.snapshot.revision}))

    async def _sse(self) -> None:
        """The same stream as Server-Sent Events; acks go to `POST /v1/client/acks`."""
        timeout = httpx.Timeout(10, read=None)  # heartbeats keep it alive; reads never time out
        async with (
            httpx.AsyncClient(timeout=timeout, headers=self._auth) as http,
            http.stream(
                "GET", self._stream_url(websocket=False), headers={"Accept": "text/event-stream"}
            ) as response,
        ):
            if response.status_code != 200:
                await response.aread()
                raise httpx.HTTPStatusError(
                    f"stream answered {response.status_code}",
                    request=response.request,
                    response=response,
                )
            self.connected.set()
            kind, data = "message", ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif not line:  # the end of one event
                    if kind == "resync":
                        raise _Resync("the server asked for a reconnect")
                    if kind in ("snapshot", "patch") and data:
                        await self._apply(json.loads(data))
                        await self._ack_over_http(http)
                    kind, data = "message", ""

    async def _ack_over_http(self, http: httpx.AsyncClient) -> None:
        if self.name is None:
            return
        body = {"client": self.name, "revision": self.snapshot.revision}
        try:
            await http.post(self.url + "/v1/client/acks", json=body)
        except httpx.HTTPError:  # an ack is advisory: the next one carries a later revision
            log.info("config ack not delivered")

    async def _apply(self, message: dict[str, Any]) -> None:
        old = self.snapshot
        new = apply_message(old, message)
        self.snapshot = new
        await self._save_cache()
        for callback in self._callbacks:
            try:
                result = callback(old.config, new.config, new.revision)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # a failing callback must not stop the stream
                log.exception("config change callback failed")
        # Waiters resume only once the callbacks of this revision have run.
        self._applied = new.revision
        async with self._changed:
            self._changed.notify_all()

    # --- cache file ---------------------------------------------------------------------

    def _load_cache(self) -> None:
        """Start from the cache file when it verifies: the client works before it connects."""
        if self.cache_path is None or not self.cache_path.exists():
            return
        try:
            doc = json.loads(self.cache_path.read_text(encoding="utf-8"))
            snapshot = Snapshot(**doc)
            verify(snapshot.previous, snapshot.revision, snapshot.config, snapshot.commitments,
                   snapshot.meta, snapshot.hash)  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, ChainError):
            log.warning("ignoring an unreadable or tampered config cache file")
            return
        self.snapshot = snapshot

    async def _save_cache(self) -> None:
        if self.cache_path is not None:
            await asyncio.to_thread(_write_private, self.cache_path, self.snapshot)


def _write_private(path: Path, snapshot: Snapshot) -> None:
    """Atomically replace `path`; owner-only, as it may hold secret values."""
    body = json.dumps(snapshot.__dict__).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ConfigClient:
    """The same client for synchronous code: its event loop runs in a daemon thread."""

    def __init__(self, url: str, key: str, **options: Any) -> None:
        self._options = (url, key, options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._client: AsyncConfigClient | None = None

    def _call(self, make: Callable[[], Any], timeout: float | None = None) -> Any:
        async def run() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def start(self) -> ConfigClient:
        self._thread.start()
        url, key, options = self._options

        async def build() -> AsyncConfigClient:
            client = AsyncConfigClient(url, key, **options)
            await client.start()
            return client

        self._client = self._call(build)
        return self

    @property
    def client(self) -> AsyncConfigClient:
        if self._client is None:
            raise RuntimeError("call start() first")
        return self._client

    @property
    def revision(self) -> int:
        return self.client.revision

    @property
    def config(self) -> dict[str, Any]:
        return self.client.config

    def get(self, key: str, default: Any = None) -> Any:
        return self.client.get(key, default)

    def on_change(self, callback: Callback) -> None:
        """Callbacks run on the client's thread."""
        self.client.on_change(callback)

    def wait_for(self, revision: int, timeout_s: float = 10.0) -> None:
        self._call(lambda: self.client.wait_for(revision, timeout_s), timeout_s + 1)

    def close(self) -> None:
        if self._client is not None:
            self._call(self._client.close, 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ConfigClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
