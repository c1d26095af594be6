"""Stage timestamps of the delivery path, for `python -m bench.delivery --trace DIR`.

Installed into the API process (`traced_app`, a uvicorn factory) and the worker process
(`python -m bench.delivery_trace worker`) by wrapping functions from the outside, so the
measured code is the shipped code. Each process writes `DIR/<pid>.jsonl` when it exits: one
line per (stage, message id, wall-clock time), plus group-commit batches and GC pauses.

Stages, per message (fan-out 1): `accept` (the route hands the message to the group
commit), `commit` (its transaction committed), `published` (the direct publish returned),
`received` (the worker's broker handler got it), `claimed` (its claim committed),
`send`/`sent` (around the POST), `recorded` (its outcome committed). The bench adds `post`
(the client sent the request), `answered` (the 202 arrived) and `arrival` (the receiver).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class _Events:
    """Appends to DIR/<pid>.jsonl; a thread flushes it twice a second (uvicorn's exit does
    not run atexit hooks reliably)."""

    def __init__(self) -> None:
        self._out: Any = None

    def open(self) -> None:
        directory = os.environ.get("BENCH_TRACE_DIR")
        if directory and self._out is None:
            self._out = open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a")  # noqa: SIM115
            threading.Thread(target=self._flusher, daemon=True).start()

    def _flusher(self) -> None:
        while True:
            time.sleep(0.5)
            self._out.flush()

    def append(self, event: tuple[Any, ...]) -> None:
        if self._out is not None:
            self._out.write(json.dumps(event) + "\n")


_events = _Events()


def _mark(stage: str, key: str, at: float | None = None) -> None:
    _events.append(("s", stage, key, time.time() if at is None else at))


def install() -> None:
    """Wrap the delivery path's steps with timestamps."""
    from relayport.core import groupcommit
    from relayport.delivery import health, intake, sender
    from relayport.delivery.transport import Transport

    _events.open()

    gc_started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started.append(time.perf_counter())
        elif gc_started:
            took = time.perf_counter() - gc_started.pop()
            _events.append(("gc", info.get("generation"), took, time.time()))

    gc.callbacks.append(on_gc)

    accept = intake.accept

    async def traced_accept(platform: Any, item: Any) -> Any:
        started = time.time()
        result = await accept(platform, item)
        _mark("accept", result.message.id, started)
        _mark("accepted", result.message.id)
        return result

    intake.accept = traced_accept

    publish_soon = intake.publish_soon

    def traced_publish_soon(platform: Any, results: Sequence[Any]) -> None:
        now = time.time()
        for r in results:
            if hasattr(r, "message"):
                _mark("commit", r.message.id, now)
        publish_soon(platform, results)

    intake.publish_soon = traced_publish_soon

    publish = intake._publish

    async def traced_publish(platform: Any, refs: Sequence[tuple[str, str]]) -> None:
        await publish(platform, refs)
        now = time.time()
        for message_id, _ in refs:
            _mark("published", message_id, now)

    intake._publish = traced_publish

    send_ref = sender.send_ref

    async def traced_send_ref(platform: Any, ref: str, announcement: str | None = None) -> int:
        _mark("received", ref)
        return await send_ref(platform, ref, announcement)

    sender.send_ref = traced_send_ref

    claim_batch = sender.claim_batch

    async def traced_claim_batch(platform: Any, session: Any, refs: Any, *a: Any) -> Any:
        started = time.time()
        out = await claim_batch(platform, session, refs, *a)
        for ref in refs:
            _mark("claim_start", ref, started)
        return out

    sender.claim_batch = traced_claim_batch  # type: ignore[assignment]

    store = groupcommit.GroupCommit._store

    async def traced_store(self: Any, items: list[Any]) -> Any:
        started = time.time()
        out = await store(self, items)
        ended = time.time()
        _events.append(("batch", self._name, len(items), started, ended))
        if self._name == "delivery.claims":
            for ref, _ in items:
                _mark("claimed", ref, ended)
        elif self._name == "delivery.outcomes":
            for o in items:
                _mark("recorded", o.message.id, ended)
        return out

    groupcommit.GroupCommit._store = traced_store  # type: ignore[method-assign]

    post = Transport.post

    async def traced_post(self: Any, url: str, body: bytes, headers: dict[str, str]) -> Any:
        key = headers.get("webhook-id", "")
        _mark("send", key)
        out = await post(self, url, body, headers)
        _mark("sent", key)
        return out

    Transport.post = traced_post  # type: ignore[method-assign]
    _ = health  # imported so the worker's modules are loaded before patching


def traced_app() -> Any:
    install()
    from bench.http_overhead import relayport_app

    return relayport_app()


STAGES = [
    "post", "accept", "commit", "accepted", "answered", "published", "received",
    "claim_start", "claimed", "send", "arrival", "sent", "recorded",
]  # fmt: skip


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


Batch = tuple[str, int, float, float, str]  # name, size, started, ended, pid
Pause = tuple[int, float, float, str]  # generation, seconds, at, pid


def _load(directory: Path) -> tuple[dict[str, dict[str, float]], list[Batch], list[Pause]]:
    stages: dict[str, dict[str, float]] = {}
    batches: list[Batch] = []
    pauses: list[Pause] = []
    for path in directory.glob("*.jsonl"):
        with path.open() as lines:
            for line in lines:
                event: list[Any] = json.loads(line)
                if event[0] == "s":
                    stages.setdefault(str(event[2]), {}).setdefault(str(event[1]), event[3])
                elif event[0] == "batch":
                    batches.append((event[1], event[2], event[3], event[4], path.stem))
                else:
                    pauses.append((event[1], event[2], event[3], path.stem))
    return stages, batches, pauses


def _stage_table(rows: dict[str, dict[str, float]]) -> None:
    print("  stage        | n    | after post p50/p99 ms | after previous p50/p99 ms")
    previous: str | None = None
    for stage in STAGES:
        have = [r for r in rows.values() if stage in r]
        if not have:
            continue
        since_post = [(r[stage] - r["post"]) * 1000 for r in have]
        step: list[float] = []
        if previous is not None:
            step = [(r[stage] - r[previous]) * 1000 for r in have if previous in r]
        print(
            f"  {stage:12} | {len(have):4} | {_pct(since_post, 0.5):8.1f} "
            f"{_pct(since_post, 0.99):8.1f} | {_pct(step, 0.5):8.1f} {_pct(step, 0.99):8.1f}"
        )
        previous = stage
    worst = sorted(rows.values(), key=lambda r: r.get("arrival", 0) - r["post"])[-5:]
    for r in worst:
        marks = " ".join(f"{s}+{(r[s] - r['post']) * 1000:.0f}" for s in STAGES if s in r)
        print(f"  slow: {marks}")


def _batch_table(batches: list[Batch], begin: float, end: float) -> None:
    by_name: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for name, size, started, ended, pid in batches:
        if begin <= started <= end:
            by_name.setdefault((name, pid), []).append((size, (ended - started) * 1000))
    for (name, pid), found in sorted(by_name.items()):
        sizes = [float(size) for size, _ in found]
        took = [ms for _, ms in found]
        print(
            f"  batches {name} (pid {pid}): {len(found)}, size p50 {_pct(sizes, 0.5):.0f} "
            f"max {max(sizes):.0f}, ms p50 {_pct(took, 0.5):.1f} p99 {_pct(took, 0.99):.1f} "
            f"max {max(took):.1f}"
        )


def _gc_table(pauses: list[Pause], begin: float, end: float) -> None:
    by_pid: dict[str, list[tuple[int, float]]] = {}
    for generation, seconds, at, pid in pauses:
        if begin <= at <= end:
            by_pid.setdefault(pid, []).append((generation, seconds * 1000))
    for pid, found in sorted(by_pid.items()):
        longest = max(found, key=lambda g: g[1])
        total = sum(ms for _, ms in found)
        full = sum(1 for g, _ in found if g == 2)
        print(
            f"  gc (pid {pid}): {len(found)} collections, {total:.0f} ms in all, longest "
            f"{longest[1]:.1f} ms (generation {longest[0]}), gen2: {full}"
        )


def summary(directory: str) -> None:
    """Per profile: the latency row's stage times after `post`, and between stages; the
    group-commit batches and GC pauses of each process during the row."""
    stages, batches, pauses = _load(Path(directory))
    for bench in sorted(Path(directory).glob("bench-*.json")):
        note = json.loads(bench.read_text())
        rows: dict[str, dict[str, float]] = {}
        for message_id, at in note["sent"].items():
            row = dict(stages.get(message_id, {}))
            row["post"] = at
            row["answered"] = note["answered"].get(message_id, float("nan"))
            rows[message_id] = row
        for message_id, at in note["arrivals"]:
            if message_id in rows:
                rows[message_id]["arrival"] = at
        begin = min(note["sent"].values())
        end = max(at for _, at in note["arrivals"])
        print(f"{bench.stem}: {len(rows)} messages, {end - begin:.1f} s")
        _stage_table(rows)
        _batch_table(batches, begin, end)
        _gc_table(pauses, begin, end)


if __name__ == "__main__" and sys.argv[1:2] == ["summary"]:
    summary(sys.argv[2])
elif __name__ == "__main__":
    install()
    from relayport.cli import app

    sys.argv = ["relayport", *sys.argv[1:]]
    with contextlib.suppress(SystemExit):
        app()
