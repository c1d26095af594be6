"""Which of an endpoint's URLs an attempt tries, in what order (pure: no I/O).

- `failover`: the primary, then each fallback in turn within the same attempt.
- `round_robin`: successive attempts start on successive URLs (then fail over).
- `adaptive`: a Thompson-sampling bandit: each URL's success probability is drawn from its
  Beta(successes + 1, failures + 1) posterior and discounted by its observed latency, so a
  URL that recovers is tried again by chance instead of being written off forever.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

POLICIES = ("failover", "round_robin", "adaptive")
# Latency at which a URL's sampled score is halved: 1 s against a typical 10-100 ms.
LATENCY_HALF_S = 1.0


@dataclass
class ArmStats:
    successes: float = 0.0
    failures: float = 0.0
    latency_s: float = 0.0  # exponentially weighted mean of successful attempts

    def record(self, success: bool, latency_s: float) -> None:
        # Decay old evidence so the bandit follows an endpoint that changes.
        self.successes *= 0.98
        self.failures *= 0.98
        if success:
            self.successes += 1
            self.latency_s = (
                latency_s if self.latency_s == 0 else 0.8 * self.latency_s + 0.2 * latency_s
            )
        else:
            self.failures += 1


def order(
    urls: Sequence[str],
    policy: str,
    *,
    counter: int = 0,
    stats: dict[str, ArmStats] | None = None,
    rng: random.Random | None = None,
) -> list[str]:
    """The URLs in the order this attempt tries them."""
    if len(urls) <= 1:
        return list(urls)
    if policy == "round_robin":
        start = counter % len(urls)
        return list(urls[start:]) + list(urls[:start])
    if policy == "adaptive":
        rng = rng or random.Random()
        stats = stats or {}

        def score(url: str) -> float:
            arm = stats.get(url) or ArmStats()
            sample = rng.betavariate(arm.successes + 1, arm.failures + 1)
            return sample / (1 + arm.latency_s / LATENCY_HALF_S)

        return sorted(urls, key=score, reverse=True)
    return list(urls)
