"""Weighted splits between backends: exact in aggregate, optionally sticky by a hashed key.

Without a sticky key, a split walks a precomputed schedule of 100 slots laid out by smooth
weighted round robin (90/10 -> nine v1, one v2, evenly interleaved), so every 100 calls
follow the weights exactly and no choice needs a random number. With a sticky key, the
key's hash picks a point in [0, 10000) and the backend whose cumulative weight covers it:
one key always gets one backend, and moving weights moves only the keys between the old
and new boundaries (a canary going 10% -> 25% keeps its first 10% of users).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import zlib
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

SLOTS = 100
HASH_SPACE = 10_000


@functools.lru_cache(maxsize=256)
def smooth_schedule(weights: tuple[int, ...], slots: int = SLOTS) -> tuple[int, ...]:
    """Indexes of `weights` (summing to `slots`) spread out as nginx's smooth WRR does.

    Cached: route tables are rebuilt on every config change, with mostly the same splits."""
    total = sum(weights)
    current = [0] * len(weights)
    schedule: list[int] = []
    indexes = range(len(weights))
    for _ in range(total):
        best, best_value = 0, None
        for i in indexes:
            value = current[i] = current[i] + weights[i]
            if best_value is None or value > best_value:
                best, best_value = i, value
        current[best] -= total
        schedule.append(best)
    return tuple(schedule)


def key_point(key: str) -> int:
    """Where a sticky key falls in [0, HASH_SPACE): stable across processes and restarts."""
    return zlib.crc32(key.encode()) % HASH_SPACE


class Split(Generic[T]):
    """Chooses among `choices` by integer `weights` summing to 100. Immutable but for the
    schedule position (one shared cursor; a pick is O(1) and never blocks)."""

    __slots__ = ("_bounds", "_cursor", "choices", "weights")

    def __init__(self, choices: Sequence[T], weights: Sequence[int]) -> None:
        if len(choices) != len(weights) or not choices:
            raise ValueError("a split needs one weight per choice")
        if sum(weights) != SLOTS or any(w < 0 for w in weights):
            raise ValueError(f"weights must be >= 0 and sum to {SLOTS}, got {list(weights)}")
        self.choices = tuple(choices)
        self.weights = tuple(weights)
        order = [choices[i] for i in smooth_schedule(tuple(weights))]
        start = random.randrange(SLOTS)  # processes start at different points of the cycle
        self._cursor: Iterator[T] = itertools.cycle(order[start:] + order[:start])
        bounds, acc = [], 0
        for w in weights:
            acc += w * (HASH_SPACE // SLOTS)
            bounds.append(acc)
        self._bounds = bounds

    @property
    def single(self) -> T | None:
        """The only choice with weight, when there is just one (no split at all)."""
        live = [c for c, w in zip(self.choices, self.weights, strict=True) if w]
        return live[0] if len(live) == 1 else None

    def next(self) -> T:
        return next(self._cursor)

    def for_key(self, key: str) -> T:
        return self.choices[bisect.bisect_right(self._bounds, key_point(key))]
