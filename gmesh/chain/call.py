"""`Call`: what one RPC looks like to the filter chain, from the first filter to the forwarder.

One object per RPC, with slots and no per-call containers until a filter asks for one, so
the hot path allocates as little as it can.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Container, Mapping
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from gmesh.chain.metadata import Metadata, metadata_value

if TYPE_CHECKING:
    from gmesh.discovery.endpoint import Endpoint, MethodKind

#: What a front door keeps per call for its forwarder (the proxy's server-side stream, the
#: channel's call object); filters never look inside it.
D = TypeVar("D")


class Caller:
    """Who is calling: mesh identity (SPIFFE ID, from mTLS or the process's own), labels and zone
    of the calling workload, and `source`: what the service graph names the caller (see
    `source_of`; "" when nobody said)."""

    __slots__ = ("identity", "labels", "peer", "source", "zone")

    def __init__(
        self,
        peer: str = "",
        identity: str = "",
        labels: dict[str, str] | None = None,
        zone: str = "",
        source: str = "",
    ) -> None:
        self.peer = peer
        self.identity = identity
        self.labels = labels or {}
        self.zone = zone
        self.source = source


#: caller labels that name the calling service, in order of preference
SOURCE_LABELS = ("service", "app")


def source_of(identity: str, labels: Mapping[str, str], fallback: str) -> str:
    """The name the service graph gives a caller: the service of its identity
    (`spiffe://<domain>/svc/<service>`), else its `service` or `app` label, else `fallback`
    (the proxy or process the calls came through). Computed once per proxy or channel."""
    if identity:
        _, marker, service = identity.rpartition("/svc/")
        if marker and service:
            return service
    for label in SOURCE_LABELS:
        value = labels.get(label)
        if value:
            return value
    return fallback


ANONYMOUS = Caller()


class Meter:
    """Where a front door adds the stream messages of a call as they pass (per method, set by
    the metrics filter in `Call.meter`), so counts stay right while the caller still reads."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


class Door(IntEnum):
    """How a call entered gmesh: through `gmesh proxy`, or a `gmesh:///` channel in the app."""

    PROXY = 0
    CHANNEL = 1


class Call(Generic[D]):
    """One RPC in flight.

    `method` is the full path (`/pkg.Service/Method`), `metadata` the request metadata as
    sent on to the upstream (filters may replace it), `deadline` an absolute
    `time.monotonic()` value or None, `service` the destination mesh service, `kind` the
    method kind when known. `endpoint` is set by the balancer; `committed` becomes True
    once part of the answer (response headers or a message) reached the caller (no retry
    after that); `stash` is a dict for filters to share per-call state (created on first
    use). `wait_for_ready`: the caller would rather wait (up to its deadline) for an
    endpoint than fail at once when there is none.

    `door`: how the call came in (`Door`). `sent` and `received` count the stream messages
    the caller sent and got (front doors count them; a replayed request is counted once),
    and add them to `meter` too when a filter set one; `sent_bytes` and `received_bytes`
    their bytes, where the door relays bytes (the proxy; 0 in a channel).

    `forward` is the front door's terminal step (proxy relay or in-process channel call);
    the chain's last handler calls it, with `downstream`, the front door's own per-call
    object. `down` holds the addresses whose connection is failing right now (balancers
    skip them).

    Set by the ROUTE phase: `route` (the matched rule, read by retry and observers) and
    `backend` (`(service, subset)`; None = every endpoint of `service`). `tried` holds the
    addresses earlier attempts used (balancers avoid them on retries). `replayable` says
    the front door can send the request again (unary calls: the request is in hand;
    streams while their replay buffer holds everything sent); `mirror` is the front door's
    way to send a copy of the call to an endpoint (None: it cannot).
    """

    __slots__ = (
        "_stash",
        "attempts",
        "backend",
        "caller",
        "committed",
        "deadline",
        "door",
        "down",
        "downstream",
        "endpoint",
        "forward",
        "kind",
        "metadata",
        "meter",
        "method",
        "mirror",
        "on_message",
        "received",
        "received_bytes",
        "replayable",
        "route",
        "sent",
        "sent_bytes",
        "service",
        "span",
        "started",
        "tried",
        "wait_for_ready",
    )

    def __init__(
        self,
        method: str,
        metadata: Metadata,
        deadline: float | None,
        service: str,
        forward: Callable[[Call[D]], Awaitable[Any]],
        downstream: Any = None,
        *,
        kind: MethodKind | None = None,
        caller: Caller = ANONYMOUS,
        down: Container[str] = frozenset(),
        replayable: bool = False,
        mirror: Callable[[Call[D], Endpoint], Awaitable[Any]] | None = None,
        wait_for_ready: bool = False,
        door: Door = Door.CHANNEL,
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        self.service = service
        self.forward = forward
        self.downstream: D = downstream
        self.kind = kind
        self.caller = caller
        self.down = down
        self.endpoint: Endpoint | None = None
        self.committed = False
        self.attempts = 0
        self.route: Any = None
        self.backend: tuple[str, str | None] | None = None
        self.tried: set[str] | None = None
        self.replayable = replayable
        self.mirror = mirror
        self.wait_for_ready = wait_for_ready
        self.started = time.monotonic()
        self.door = door
        self.sent = 0
        self.received = 0
        self.meter: Meter | None = None
        #: message bytes each way, where the front door sees bytes (the proxy)
        self.sent_bytes = 0
        self.received_bytes = 0
        #: the call's trace span when it is traced (parent of its attempts' spans), else None
        self.span: Any = None
        #: called by the front door for each request message the caller sends on a stream (set
        #: by a filter that limits them); raising `CallError` ends the stream with that status
        self.on_message: Callable[[], None] | None = None
        self._stash: dict[str, Any] | None = None

    @property
    def stash(self) -> dict[str, Any]:
        if self._stash is None:
            self._stash = {}
        return self._stash

    def header(self, key: str) -> str | None:
        """The first value of request metadata `key` (lowercase), or None (`-bin` values as latin-1)."""
        return metadata_value(self.metadata, key)

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def upstream_timeout(self) -> float | None:
        """The timeout to give the next hop, never more than the time left.

        grpc-core sends `grpc-timeout` rounded *up* to three significant digits (10 ms
        steps from 1 s, 100 ms from 10 s, 1 s from 100 s) after rounding the deadline up
        to a millisecond; a relay passing its remaining time on as is would extend the
        caller's deadline by up to one step per hop. So: round down to the step, and take
        2 ms off for the millisecond rounding.
        """
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        step = 0.001 if left < 1.0 else 0.01 if left < 10.0 else 0.1 if left < 100.0 else 1.0
        return max(int(left / step) * step - 0.002, 0.001)

    @property
    def grpc_service(self) -> str:
        """`pkg.Service` of `/pkg.Service/Method`."""
        return self.method[1:].partition("/")[0]

    def __repr__(self) -> str:
        return f"<Call {self.method} -> {self.service}>"


#: A mirrored copy never waits longer than this (the original may have no deadline).
MIRROR_TIMEOUT = 10.0


def mirror_metadata(metadata: Metadata) -> Metadata:
    """Metadata of a mirrored copy: marked, so the mirror's owner can tell copies from real calls."""
    return (*metadata, ("x-gmesh-mirror", "1"))


def mirror_timeout(call: Call[Any]) -> float:
    """The timeout of a mirrored copy of `call`: the original's time left, capped."""
    left = call.time_remaining()
    return MIRROR_TIMEOUT if left is None else max(min(left, MIRROR_TIMEOUT), 0.001)
