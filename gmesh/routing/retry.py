"""Retry decisions without I/O: the retry budget and backoff with jitter.

The budget (Linkerd's and Finagle's design) caps retries at a share of recent requests
plus a small floor per second, over a sliding window, so that when every endpoint fails
retries add at most that share of load instead of multiplying it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class RetryBudget:
    """At most `ratio` x requests + `min_per_second` x window retries within the last `window` seconds.

    O(1) per request and per retry: one counter pair per second in a ring. Not thread
    safe; one event loop uses it.
    """

    __slots__ = ("_clock", "_now", "_requests", "_retries", "min_per_second", "ratio", "window")

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = max(int(window), 1)
        self._clock = clock
        self._requests = [0] * self.window
        self._retries = [0] * self.window
        self._now = int(clock())

    def _advance(self) -> int:
        now = int(self._clock())
        if now != self._now:
            gap = min(now - self._now, self.window)
            for step in range(1, gap + 1):
                slot = (self._now + step) % self.window
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._now = now
        return now % self.window

    def record_request(self) -> None:
        self._requests[self._advance()] += 1

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it; False means: do not retry."""
        slot = self._advance()
        # + 1e-9: 0.29 x 100 is 28.999999999999996 in floating point, and must allow 29.
        allowed = self.ratio * sum(self._requests) + self.min_per_second * self.window + 1e-9
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    def usage(self) -> tuple[int, int]:
        """(requests, retries) in the current window."""
        self._advance()
        return sum(self._requests), sum(self._retries)


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (1 = first retry): full jitter in
    [0, min(cap, base x 2^(attempt-1))), as AWS's and gRPC's retry designs recommend."""
    return float(rand() * min(cap, base * (2 ** (attempt - 1))))


class RetryStats:
    """Retries made and retries the budget (or the breaker's maxRetries) refused, per service."""

    __slots__ = ("denied", "retries")

    def __init__(self) -> None:
        self.retries = 0
        self.denied = 0
