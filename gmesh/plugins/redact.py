"""Built-in plugin: credentials never leave the process in telemetry.

Wherever telemetry shows request metadata — access log `headers`, span attributes, `gmesh tap`
— the values of `authorization`, `proxy-authorization`, `cookie`, `set-cookie` and `x-api-key`
show as `<redacted>`. Plugins add their own rules through the same hook
(`gmesh_redact_metadata`); what is sent upstream never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gmesh.hookspecs import hookimpl
from gmesh.stats.edits import MetadataRedactor

#: Request metadata whose values telemetry never shows.
CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})


def hide_credentials(service: str, pairs: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(key, "<redacted>" if key in CREDENTIALS else value) for key, value in pairs]


@hookimpl(trylast=True)
def gmesh_redact_metadata() -> list[MetadataRedactor]:
    return [hide_credentials]
