"""Built-in plugin: registers the core kinds `Service` (gmesh/config/service.py, per-service
policy) and `Telemetry` (gmesh/config/telemetry.py, what gmesh records about calls)."""

from __future__ import annotations

from gmesh.config.kinds import KindRegistry
from gmesh.config.service import SERVICE
from gmesh.config.telemetry import TELEMETRY
from gmesh.hookspecs import hookimpl


@hookimpl(trylast=True)
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(SERVICE)
    kinds.add(TELEMETRY)
