"""gmesh's Prometheus metrics in an application: join your registry, or serve `/metrics`.

An application that already exposes Prometheus metrics adds gmesh's with one line::

    gmesh.metrics.register()             # prometheus_client's default REGISTRY
    gmesh.metrics.register(my_registry)  # or a registry of your own

An application without one serves them (and the process's own CPU and memory) over HTTP::

    gmesh.metrics.serve(9464)            # http://127.0.0.1:9464/metrics

Every `gmesh:///` channel (and proxy) in the process is counted by the one collector; the
families and labels are in docs/metrics.md.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gmesh.stats.metrics import COLLECTOR, MeshCollector

__all__ = ["COLLECTOR", "MeshCollector", "MetricsServer", "process_registry", "register", "serve"]

_lock = threading.Lock()


def register(registry: CollectorRegistry = REGISTRY) -> MeshCollector:
    """Add gmesh's collector to `registry` (once; calling again does nothing). Returns it."""
    with _lock:
        names = getattr(registry, "_collector_to_names", {})
        if COLLECTOR not in names:
            registry.register(COLLECTOR)
    return COLLECTOR


def process_registry() -> CollectorRegistry:
    """A registry of gmesh's metrics and this process's own (CPU, memory, file descriptors, GC):
    what `gmesh proxy --metrics` serves."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(COLLECTOR)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    """A running `/metrics` HTTP server (prometheus-client's, on a thread of its own)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve `/metrics` on `addr:port` (port 0: any free one; see `.address`) in a thread.

    Prometheus text by default, OpenMetrics when the scraper asks for it (Accept header).
    Without `registry`: gmesh's metrics joined to prometheus_client's default registry (which
    already holds the process's CPU, memory and GC collectors)."""
    if registry is None:
        register(REGISTRY)
        registry = REGISTRY
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        from gmesh.errors import AddressInUse

        raise AddressInUse(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
    return MetricsServer(server, thread)
