"""Retry schedule and `Retry-After` parsing (pure: no I/O)."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
from collections.abc import Sequence

# Immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: about 27.5 hours in all, so an
# endpoint that is down for a day still gets every message.
DEFAULT_SCHEDULE_S: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


def max_attempts(schedule: Sequence[float]) -> int:
    return len(schedule)


def delay_after(
    attempts_done: int,
    schedule: Sequence[float],
    *,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before the next attempt once `attempts_done` attempts failed; None when
    the schedule is spent. ±`jitter` spreads deliveries that failed together, so a recovering
    endpoint is not hit by all of them in the same second."""
    if attempts_done >= len(schedule):
        return None
    base = float(schedule[attempts_done])
    if base <= 0:
        return 0.0
    return base * (rng or random).uniform(1 - jitter, 1 + jitter)


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """`Retry-After` as seconds from `now` (delta-seconds or an HTTP-date); None if absent or
    unreadable. Negative values (a date in the past) become 0."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # str.isdigit() also accepts "²"
        return float(min(int(text), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def honour_retry_after(scheduled: float, retry_after: float | None, cap_s: float) -> float:
    """The later of the schedule's delay and the receiver's wish, the wish bounded by `cap_s`
    (a receiver must not park a delivery for a year)."""
    if retry_after is None:
        return scheduled
    return max(scheduled, min(retry_after, cap_s))
