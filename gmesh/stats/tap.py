"""Taps: live calls of a service handed to whoever watches (`gmesh tap`), bounded every way.

A `TapHub` per mesh stack holds the open taps by service. The `tap` filter of a service asks
the hub whether anyone watches it — one dict lookup per call when nobody does — and a tap
that wants the call gets an event when it ends. Every tap is bounded: at most `MAX_TAPS` open
per process, a token bucket of `max_rate` events per second, a queue of `QUEUE` events and
`QUEUE_BYTES` of bodies (a slow reader loses events, counted, and never slows a call), bodies
cut to `max_body_bytes`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: open taps per process at most
MAX_TAPS = 4
#: events waiting per tap at most, and their bodies' bytes at most
QUEUE = 256
QUEUE_BYTES = 4 << 20
DEFAULT_RATE, MAX_RATE = 100, 1000
DEFAULT_BODY, MAX_BODY = 4096, 65536


class TooManyTaps(Exception):
    """`MAX_TAPS` taps are open already."""


@dataclass(eq=False)
class Tap:
    """One watcher of one service: which methods, how fast, with or without bodies."""

    service: str
    method: str = ""
    bodies: bool = False
    rate: float = DEFAULT_RATE
    max_body: int = DEFAULT_BODY
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE))
    #: calls skipped since the last event handed over (rate cap or a full queue)
    dropped: int = 0
    #: body bytes of the events waiting
    queued_bytes: int = 0
    _tokens: float = 0.0
    _at: float = 0.0

    def __post_init__(self) -> None:
        self.rate = float(min(max(self.rate, 1), MAX_RATE))
        self.max_body = min(max(self.max_body, 1), MAX_BODY)
        self._tokens, self._at = self.rate, time.monotonic()

    def wants(self, method: str) -> bool:
        """Whether this tap takes a call of `method` now (spends a token when it does)."""
        if self.method and not (
            method == self.method or (self.method.endswith("/") and method.startswith(self.method))
        ):
            return False
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            self.dropped += 1
            return False
        self._tokens -= 1.0
        return True

    def offer(self, event: dict[str, Any]) -> None:
        """Hand an event over, or drop it (counted) when the reader is behind."""
        size = len(event.get("request", b"")) + len(event.get("response", b""))
        if self.queue.full() or self.queued_bytes + size > QUEUE_BYTES:
            self.dropped += 1
            return
        event["dropped"], self.dropped = self.dropped, 0
        self.queued_bytes += size
        self.queue.put_nowait(event)

    async def next_event(self) -> dict[str, Any]:
        """The next event, waiting for one."""
        event = await self.queue.get()
        self.queued_bytes -= len(event.get("request", b"")) + len(event.get("response", b""))
        return event


class TapHub:
    """The open taps of one mesh stack, by service. Event loop only."""

    def __init__(self) -> None:
        self.by_service: dict[str, list[Tap]] = {}

    def __len__(self) -> int:
        return sum(len(taps) for taps in self.by_service.values())

    def open(self, tap: Tap) -> Tap:
        if len(self) >= MAX_TAPS:
            raise TooManyTaps(f"{MAX_TAPS} taps are open in this process already")
        self.by_service.setdefault(tap.service, []).append(tap)
        return tap

    def close(self, tap: Tap) -> None:
        taps = self.by_service.get(tap.service)
        if taps is not None and tap in taps:
            taps.remove(tap)
            if not taps:
                del self.by_service[tap.service]

    def watching(self, service: str, method: str) -> Iterator[Tap]:
        """The taps of `service` that take a call of `method` now."""
        for tap in self.by_service.get(service, ()):
            if tap.wants(method):
                yield tap


def cut(body: bytes | None, limit: int) -> tuple[bytes, bool]:
    """`body` cut to `limit` bytes, and whether it was cut."""
    if body is None:
        return b"", False
    return (body[:limit], True) if len(body) > limit else (body, False)
