"""What plugins give to edit telemetry before it leaves the process: metadata redactors, access log
fields and body redactors (the `gmesh_redact_metadata`, `gmesh_access_log_fields` and
`gmesh_redact_bodies` hooks)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gmesh.chain.call import Call

#: ``redact(service, pairs) -> pairs``: the request metadata to show in telemetry
MetadataRedactor = Callable[[str, Sequence[tuple[str, Any]]], Iterable[tuple[str, Any]]]
#: ``field(entry, call)``: add or change fields of an access log line
AccessLogField = Callable[[dict[str, Any], "Call[Any]"], None]
#: ``redact(service, method, "request" | "response", body) -> body``: a message as taps show it
BodyRedactor = Callable[[str, str, str, bytes], bytes]


@dataclass(frozen=True, slots=True)
class TelemetryEdits:
    """Every plugin's redactors and access log fields, in plugin order."""

    redact_metadata: tuple[MetadataRedactor, ...] = ()
    access_log_fields: tuple[AccessLogField, ...] = ()
    redact_body: tuple[BodyRedactor, ...] = ()

    def shown(self, service: str, pairs: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """`pairs` as every redactor lets them be shown."""
        out = list(pairs)
        for redact in self.redact_metadata:
            out = list(redact(service, out))
        return out


NO_EDITS = TelemetryEdits()

log = logging.getLogger(__name__)
_last_report: dict[str, float] = {}


def report_failure(what: str) -> None:
    """A telemetry step failed (a plugin's redactor or field, a full disk): log it — at most once
    a minute per `what`, with the traceback — and go on. Telemetry never fails a call."""
    now = time.monotonic()
    if now - _last_report.get(what, -1e9) >= 60.0:
        _last_report[what] = now
        log.exception("%s failed (the call is unaffected; next report in a minute at most)", what)
