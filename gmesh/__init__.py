"""gmesh: a gRPC-first service mesh in Python.

async with gmesh.register("127.0.0.1:50051", service="orders", labels={"version": "v2"}):
    await server.wait_for_termination()
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from gmesh.hookspecs import hookimpl

if TYPE_CHECKING:
    from gmesh.discovery.registry import Registration, register

try:
    __version__ = version("gmesh")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "Registration",
    "__version__",
    "hookimpl",
    "register",
    "server_credentials",
    "server_interceptors",
    "workload_identity",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so `import gmesh` (and the CLI's start) stays light.
    if name in ("register", "Registration"):
        from gmesh.discovery import registry

        return getattr(registry, name)
    if name in ("server_credentials", "server_interceptors", "workload_identity"):
        from gmesh.security import server

        return getattr(server, name)
    if name in ("metrics", "admin"):
        import importlib

        return importlib.import_module(f"gmesh.{name}")
    raise AttributeError(f"module 'gmesh' has no attribute {name!r}")
