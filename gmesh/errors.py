"""gmesh's error hierarchy, and the one place that maps it to gRPC status codes.

Every error a user can cause or meet carries a message that reads on one line; the CLI
prints it as is, the data path turns it into a gRPC status with `grpc_status`.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


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


class EmbeddedEtcdError(GmeshError):
    """The embedded etcd could not be started, stopped or found."""

    status = grpc.StatusCode.UNAVAILABLE


class CallError(GmeshError):
    """Ends one RPC with a gRPC status: raised by filters and the data path, sent to the caller."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
        *,
        endpoint_fault: bool = True,
    ) -> None:
        super().__init__(details)
        self.status = code
        self.details = details
        self.trailing_metadata = trailing_metadata
        #: False when the mesh ended the call on purpose (a stream's max age), so it must not
        #: count against the endpoint (outlier detection, rollout counters)
        self.endpoint_fault = endpoint_fault


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
