"""Built-in plugin: registers the core kinds `Service` (gmesh/config/service.py, per-service
policy), `Telemetry` (gmesh/config/telemetry.py, what gmesh records about calls) and
`AuthorizationPolicy` (gmesh/security/authz.py, who may call what)."""

from __future__ import annotations

from gmesh.config.kinds import KindRegistry
from gmesh.config.service import SERVICE
from gmesh.config.telemetry import TELEMETRY
from gmesh.hookspecs import hookimpl
from gmesh.security.authz import AUTHORIZATION_POLICY


@hookimpl(trylast=True)
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(SERVICE)
    kinds.add(TELEMETRY)
    kinds.add(AUTHORIZATION_POLICY)
