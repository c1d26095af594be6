"""The failure-rate window of a circuit breaker (pure: no I/O).

Each worker keeps one `FailureWindow` per endpoint and decides from it when to open the
circuit; the state itself (open until when, half-open probe) lives on the endpoint row, so
every worker holds deliveries back once any of them opened it.
"""

from __future__ import annotations

from collections import deque


class FailureWindow:
    """Outcomes of the last `window_s` seconds; `should_open` once at least `min_requests`
    were seen and the failure share reached `failure_ratio`."""

    def __init__(self, *, window_s: float, min_requests: int, failure_ratio: float) -> None:
        self.window_s = window_s
        self.min_requests = min_requests
        self.failure_ratio = failure_ratio
        self._events: deque[tuple[float, bool]] = deque()
        self._failures = 0

    def record(self, now: float, success: bool) -> None:
        self._events.append((now, success))
        if not success:
            self._failures += 1
        self._trim(now)

    def reset(self) -> None:
        self._events.clear()
        self._failures = 0

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._events and self._events[0][0] < horizon:
            _, ok = self._events.popleft()
            if not ok:
                self._failures -= 1

    def failure_rate(self, now: float) -> float:
        self._trim(now)
        return self._failures / len(self._events) if self._events else 0.0

    def should_open(self, now: float) -> bool:
        self._trim(now)
        return (
            len(self._events) >= self.min_requests
            and self._failures / len(self._events) >= self.failure_ratio
        )
