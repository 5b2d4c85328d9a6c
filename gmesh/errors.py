"""gmesh's error hierarchy, the one place that maps it to gRPC status codes, and the one
classification of how a call ended (`Outcome`, `outcome_of`).

Every error a user can cause or meet carries a message that reads on one line; the CLI
prints it as is, the data path turns it into a gRPC status with `grpc_status`. Every
filter that judges a call (stats, outlier detection, retries, breakers, rollouts) reads
`outcome_of`, so a status means the same to all of them, in both front doors.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import grpc.aio


class GmeshError(Exception):
    """Base of every error gmesh raises on purpose."""

    status = grpc.StatusCode.UNKNOWN


class InvalidArgument(GmeshError):
    """Bad input: an address, a label, a flag value, a name."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GmeshError):
    """A named thing (kind, resource, service) does not exist."""

    status = grpc.StatusCode.NOT_FOUND


class Conflict(GmeshError):
    """A compare-and-swap lost: someone else changed the same keys first."""

    status = grpc.StatusCode.ABORTED


class StoreUnavailable(GmeshError):
    """etcd could not be reached (or did not answer in time)."""

    status = grpc.StatusCode.UNAVAILABLE


class AddressInUse(GmeshError):
    """A listen address is taken (another gmesh proxy, or any other program), or cannot be bound."""

    status = grpc.StatusCode.UNAVAILABLE


class EmbeddedEtcdError(GmeshError):
    """The embedded etcd could not be started, stopped or found."""

    status = grpc.StatusCode.UNAVAILABLE


class Origin:
    """Who ended a call with a status: the data path's classification reads it (`outcome_of`)."""

    #: the upstream endpoint answered with this status
    ENDPOINT = "endpoint"
    #: gmesh could not serve the call (no endpoints, a breaker, a limit, a filter's verdict)
    MESH = "mesh"
    #: gmesh ended the call on purpose and the caller should just reconnect (a stream's max age)
    DELIBERATE = "deliberate"


class CallError(GmeshError):
    """Ends one RPC with a gRPC status: raised by filters and the data path, sent to the caller.

    Filters raise it with the default origin (`Origin.MESH`: the mesh refused or could not
    serve the call); forwarders raise `UpstreamError` for a status an endpoint sent.
    """

    origin = Origin.MESH

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
        *,
        origin: str | None = None,
    ) -> None:
        super().__init__(details)
        self.status = code
        self.details = details
        self.trailing_metadata = trailing_metadata
        if origin is not None:
            self.origin = origin

    @property
    def endpoint_fault(self) -> bool:
        """Whether this status counts against the endpoint that served the attempt."""
        return self.origin == Origin.ENDPOINT and self.status in SERVER_ERRORS


class UpstreamError(CallError):
    """A non-OK status an upstream endpoint sent (relayed as is to the caller).

    `initial_metadata` holds the response headers the endpoint sent before failing (empty
    for a trailers-only answer); `rpc_error` the grpc.aio error it came as, when it did
    (the in-process channel hands that very object to the application).
    """

    origin = Origin.ENDPOINT

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
        *,
        initial_metadata: tuple[tuple[str, str | bytes], ...] = (),
        rpc_error: BaseException | None = None,
    ) -> None:
        super().__init__(code, details, trailing_metadata)
        self.initial_metadata = initial_metadata
        self.rpc_error = rpc_error


#: Codes that say the server side failed (the caller's own mistakes never count against an
#: endpoint or a backend): what outlier detection, retry-free error rates and canaries judge.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

#: grpc.aio's invented status when one of our writes lost a race with the server's end
#: (see `gmesh.outbound.upstream.StatusWatch`, which waits for the real one).
SYNTHETIC_INTERNAL = "Internal error from Core"


class Outcome:
    """How one attempt or call ended, as every filter sees it, in both front doors.

    `code` and `details`: the gRPC status. `failed`: the server side failed the call (a code
    in `SERVER_ERRORS` that gmesh did not produce on purpose): what error rates and canaries
    count. `endpoint_fault`: an endpoint answered with that failure: what outlier detection
    and per-endpoint errors count (a call gmesh refused, found no endpoint for, or ended at
    its max age is no endpoint's fault). `committed`: the caller had already seen part of the
    answer (response headers or a message), so it could not be retried.
    """

    __slots__ = ("code", "committed", "details", "endpoint_fault", "failed")

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str = "",
        *,
        failed: bool = False,
        endpoint_fault: bool = False,
        committed: bool = False,
    ) -> None:
        self.code = code
        self.details = details
        self.failed = failed
        self.endpoint_fault = endpoint_fault
        self.committed = committed

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    def __repr__(self) -> str:
        flags = [f for f in ("failed", "endpoint_fault", "committed") if getattr(self, f)]
        return f"<Outcome {self.code.name} {' '.join(flags)}>".replace(" >", ">")


OK = Outcome(grpc.StatusCode.OK)
_OK_COMMITTED = Outcome(grpc.StatusCode.OK, committed=True)


def outcome_of(
    error: BaseException | None, committed: bool = False, deadline: float | None = None
) -> Outcome:
    """The one classification of how a call or attempt ended (None: it succeeded).

    - `CallError` (and `UpstreamError`): its code; an endpoint is to blame only for a
      server-class code it sent itself; a deliberate end (max age) is no failure at all.
    - `grpc.aio.AioRpcError` (an upstream status not yet wrapped): as an endpoint's status;
      grpc.aio's synthetic INTERNAL (a write raced the end and the real status never came)
      means the connection broke: UNAVAILABLE, the endpoint's fault.
    - `asyncio.CancelledError`: CANCELLED, nobody's failure (the caller went away) — unless
      `deadline` (a `time.monotonic()` value) is given and has passed: then the call's deadline
      ran out first, DEADLINE_EXCEEDED as its caller saw it (a failure, no endpoint's fault).
    - anything else: INTERNAL, a failure of gmesh itself, not of the endpoint.
    """
    if error is None:
        return _OK_COMMITTED if committed else OK
    if isinstance(error, CallError):
        code = error.status
        if error.origin == Origin.DELIBERATE:
            return Outcome(code, error.details, committed=committed)
        failed = code in SERVER_ERRORS
        return Outcome(
            code,
            error.details,
            failed=failed,
            endpoint_fault=failed and error.origin == Origin.ENDPOINT,
            committed=committed,
        )
    if isinstance(error, grpc.aio.AioRpcError):
        code = error.code()
        details = error.details() or ""
        if code is grpc.StatusCode.INTERNAL and details == SYNTHETIC_INTERNAL:
            code = grpc.StatusCode.UNAVAILABLE
        failed = code in SERVER_ERRORS
        return Outcome(code, details, failed=failed, endpoint_fault=failed, committed=committed)
    if isinstance(error, asyncio.CancelledError):
        if deadline is not None and time.monotonic() >= deadline:
            return Outcome(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", failed=True, committed=committed
            )
        return Outcome(grpc.StatusCode.CANCELLED, "cancelled", committed=committed)
    return Outcome(
        grpc.StatusCode.INTERNAL,
        f"gmesh internal error: {type(error).__name__}",
        failed=True,
        committed=committed,
    )


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in one config document: where it is and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str
    resource: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        what = f"{self.resource}: " if self.resource else ""
        field = f"{self.path}: " if self.path else ""
        return f"{where}: {what}{field}{self.message}"


class ConfigError(InvalidArgument):
    """Config documents failed validation; `problems` lists each, with file, line and field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = len(problems)
        head = f"{count} problem{'s' if count != 1 else ''} in config, nothing was written"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status (code, details) a data-path caller should see for `error`."""
    if isinstance(error, GmeshError):
        return error.status, str(error)
    return grpc.StatusCode.INTERNAL, f"gmesh internal error: {type(error).__name__}"
