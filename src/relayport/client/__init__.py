"""Python client of Relayport live configuration.

    async with AsyncConfigClient(url, key, name="pod-1", cache_path="cfg.json") as cfg:
        cfg.on_change(lambda old, new, revision: ...)
        cfg.get("feature", default=False)

    cfg = ConfigClient(url, key, name="pod-1")   # the same, driven by a background thread
    cfg.start(); cfg.get("feature"); cfg.close()

It keeps a WebSocket to `/v1/client/stream` (Server-Sent Events where WebSocket does not get
through, or with `transport="sse"`), resumes from its last revision, checks every
version's hash and its link to the previous one, writes a cache file (so it starts offline with
the last known configuration), calls the change callbacks and acknowledges each revision after
applying it. Lost connections are retried with exponential backoff and full jitter.
"""

from relayport.client.core import AsyncConfigClient, ChainError, ConfigClient, Snapshot

__all__ = ["AsyncConfigClient", "ChainError", "ConfigClient", "Snapshot"]
