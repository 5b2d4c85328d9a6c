"""Built-in plugin: registers the `Service` kind (gmesh/config/service.py), per-service policy."""

from __future__ import annotations

from gmesh.config.kinds import KindRegistry
from gmesh.config.service import SERVICE
from gmesh.hookspecs import hookimpl


@hookimpl(trylast=True)
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(SERVICE)
