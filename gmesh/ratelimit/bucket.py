"""Token buckets as GCRA (the generic cell rate algorithm): one float per key, O(1) per call.

A bucket of `burst` tokens refilled at `rate` per second is its theoretical arrival time
(TAT): admitting a call moves TAT one emission interval (1/rate) later, starting from now if
TAT is in the past; a call is refused when that would put TAT more than `burst` intervals
ahead of now. A full bucket is a TAT in the past, which is also what an absent key means: so a
key whose bucket is full may be forgotten without changing any decision.

`Buckets` keeps buckets per key, at most `max_keys` of them. When the table is full, buckets
that are full are dropped (only those: a caller who has spent tokens never gains a refill by
being evicted). If every bucket in the table is in use, a new key shares one overflow bucket
with every other key that found no room — under a flood of made-up keys, legitimate keys
already in the table keep their own limits, and the newcomers together get one key's rate.
Memory is bounded by `max_keys` entries (a key string and a float each).
"""

from __future__ import annotations

import fcntl
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

#: a full table is swept for full buckets at most this often (seconds): a flood of new keys
#: against a table of active ones costs one sweep per interval, not one per call
SWEEP_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one `take` decided."""

    admitted: bool
    #: tokens left after this call (0 when refused)
    remaining: int
    #: seconds until the next token (0 when admitted with tokens to spare)
    retry_after: float
    #: seconds until the bucket is full again
    reset: float


class Bucket:
    """The GCRA parameters of one limit: `rate` tokens per second, `burst` tokens at most."""

    __slots__ = ("burst", "interval", "rate", "tolerance")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0:
            raise ValueError("rate must be greater than 0")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self.interval = 1.0 / rate
        # a nanosecond of slack: float rounding must not refuse a call that arrives exactly on time
        self.tolerance = burst * self.interval + 1e-9

    def reset(self, rate: float, burst: int) -> None:
        """New parameters (a global limit's share changed); TATs already given stay valid."""
        self.rate = rate
        self.burst = max(int(burst), 1)
        self.interval = 1.0 / rate
        self.tolerance = self.burst * self.interval + 1e-9

    def take(self, tat: float, now: float) -> tuple[float, bool]:
        """(the new TAT, admitted) for one call at `now` on a bucket at `tat`."""
        new = (tat if tat > now else now) + self.interval
        if new - now > self.tolerance:
            return tat, False
        return new, True

    def verdict(self, tat: float, now: float, admitted: bool) -> Verdict:
        """The numbers a caller is told (x-ratelimit-* trailers, RetryInfo), from the TAT after."""
        ahead = max(tat - now, 0.0)
        remaining = max(int((self.tolerance - ahead) / self.interval + 1e-9), 0)
        if admitted:
            return Verdict(True, remaining, 0.0, ahead)
        # refused: the next call fits once TAT + interval - now <= tolerance
        wait = max(ahead + self.interval - self.tolerance, 0.0)
        return Verdict(False, 0, wait, ahead)


class Buckets:
    """Buckets by key for one limit; see the module doc for the bound on keys."""

    __slots__ = ("_last_sweep", "_tats", "bucket", "evicted", "max_keys", "overflow", "overflowed")

    def __init__(self, bucket: Bucket, max_keys: int = 100_000) -> None:
        self.bucket = bucket
        self.max_keys = max(int(max_keys), 1)
        self._tats: dict[object, float] = {}
        #: the TAT of the bucket shared by keys that found no room
        self.overflow = -math.inf
        self._last_sweep = -math.inf
        #: calls that went to the overflow bucket, keys dropped from the table
        self.overflowed = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._tats)

    def rescale(self, rate: float, burst: int, now: float) -> None:
        """New rate and burst (a global limit's share changed): tokens already owed stay owed, at
        the new rate — a call admitted under a tiny share must not block the key for the time
        that share would have needed to refill."""
        old = self.bucket.interval
        self.bucket.reset(rate, burst)
        scale = self.bucket.interval / old
        for key, tat in self._tats.items():
            if tat > now:
                self._tats[key] = now + (tat - now) * scale
        if self.overflow > now:
            self.overflow = now + (self.overflow - now) * scale

    def take(self, key: object, now: float) -> bool:
        """Admit one call of `key` at `now` (monotonic seconds)?"""
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self.max_keys and not self._make_room(now):
                self.overflowed += 1
                self.overflow, admitted = self.bucket.take(self.overflow, now)
                return admitted
            tat = -math.inf
        new, admitted = self.bucket.take(tat, now)
        if admitted:
            tats[key] = new
        return admitted

    def tat(self, key: object) -> float:
        """The key's TAT (-inf: a full bucket), for the numbers told to callers."""
        found = self._tats.get(key)
        return (
            found if found is not None else (self.overflow if len(self._tats) >= self.max_keys else -math.inf)
        )

    def verdict(self, key: object, now: float, admitted: bool) -> Verdict:
        return self.bucket.verdict(self.tat(key), now, admitted)

    def _make_room(self, now: float) -> bool:
        """Drop the full buckets (TAT in the past) of a full table; whether there is room now."""
        if now - self._last_sweep < SWEEP_INTERVAL:
            return False
        self._last_sweep = now
        full = [k for k, tat in self._tats.items() if tat <= now]
        for key in full:
            del self._tats[key]
        self.evicted += len(full)
        return len(self._tats) < self.max_keys


#: where the workers of one `gmesh proxy --workers N` keep the buckets they share (set by the
#: supervisor for its workers; unset: every process has its own buckets)
SHARED_DIR_ENV = "GMESH_SHARED_LIMITS"


class SharedBuckets:
    """Buckets shared by the worker processes of one proxy, so that together they admit what one
    process would: TATs (8-byte floats of the system-wide monotonic clock) in a memory-mapped
    file, keys hashed to `slots` slots, each read-modify-write under an exclusive `flock`.

    Two keys that hash to one slot share a bucket (they may get less, never more, than their
    limit); memory is fixed: 8 bytes per slot. A zeroed slot is a full bucket (monotonic time
    is far past 0). Costs two system calls per check, paid only with `--workers` > 1.
    """

    __slots__ = (
        "__weakref__",
        "_fd",
        "_map",
        "_view",
        "bucket",
        "evicted",
        "max_keys",
        "overflowed",
        "slots",
        "used",
    )

    def __init__(self, bucket: Bucket, path: str, max_keys: int = 100_000) -> None:
        import mmap
        import weakref

        self.bucket = bucket
        self.max_keys = max(int(max_keys), 1)
        self.slots = 1 << max(self.max_keys - 1, 1).bit_length()  # a power of two >= max_keys
        size = self.slots * 8
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # zeros: every bucket full
        self._map = mmap.mmap(self._fd, size)
        self._view = memoryview(self._map).cast("d")
        self.overflowed = 0
        self.evicted = 0
        self.used = 0  # slots this process found in use (a count, not a scan)
        # a limit that changed or went away takes its mapping and descriptor with it
        weakref.finalize(self, _unmap, self._view, self._map, self._fd)

    def __len__(self) -> int:
        return self.used

    def _slot(self, key: object) -> int:
        if key is None:
            return 0
        raw = key if isinstance(key, bytes) else str(key).encode()
        return zlib.crc32(raw) & (self.slots - 1)

    def take(self, key: object, now: float) -> bool:
        slot = self._slot(key)
        view = self._view
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            tat = view[slot]
            new, admitted = self.bucket.take(tat, now)
            if admitted:
                if tat == 0.0:
                    self.used += 1
                view[slot] = new
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return admitted

    def tat(self, key: object) -> float:
        return float(self._view[self._slot(key)])

    def verdict(self, key: object, now: float, admitted: bool) -> Verdict:
        return self.bucket.verdict(self.tat(key), now, admitted)


def _unmap(view: Any, mapping: Any, fd: int) -> None:
    view.release()
    mapping.close()
    os.close(fd)


def buckets_for(bucket: Bucket, max_keys: int, name: str) -> Buckets | SharedBuckets:
    """This process's buckets for a limit, or, in a worker of `gmesh proxy --workers N`, the ones
    its workers share (`name` identifies the limit and its parameters)."""
    import hashlib

    shared = os.environ.get(SHARED_DIR_ENV)
    if not shared:
        return Buckets(bucket, max_keys)
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return SharedBuckets(bucket, os.path.join(shared, digest), max_keys)
