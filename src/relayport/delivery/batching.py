"""Groups the broker messages a worker holds into batches: one claim, one read and one
outcome transaction per batch instead of per message. Under load the broker hands a worker up
to `prefetch` messages at once; claiming them together turns dozens of small write
transactions into one (SQLite has a single writer, and every commit costs a round trip).

A message is acknowledged only once its batch has run, as before: the handler awaits it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("relayport.delivery")

MAX_BATCH = 256


class Batcher:
    def __init__(
        self, run: Callable[[Sequence[str]], Awaitable[int]], *, max_batch: int = MAX_BATCH
    ) -> None:
        self._run = run
        self._max = max_batch
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._scheduled = False

    async def submit(self, ref: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((ref, future))
        if not self._scheduled:
            # Let the other messages the broker delivered in this loop turn join the batch.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending:
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            asyncio.get_running_loop().create_task(self._go(batch))

    async def _go(self, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        try:
            await self._run([ref for ref, _ in batch])
            error: BaseException | None = None
        except Exception as exc:  # reported to every message of the batch
            error = exc
        for _, future in batch:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
