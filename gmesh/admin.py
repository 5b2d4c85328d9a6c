"""gmesh's admin service in an application: `gmesh tap` and config dumps of its channels.

The proxy serves `gmesh.v1.Admin` on its admin port; an application whose calls go through
`gmesh:///` channels adds the same service to a gRPC server of its own::

    server = grpc.aio.server()
    gmesh.admin.add_to_server(server)      # then: gmesh tap orders --admin HOST:PORT

Tap events and dumps come from the outbound stacks running in the process.
"""

from __future__ import annotations

from typing import Any

import grpc

from gmesh.outbound import stack
from gmesh.proxy.admin import _Admin, config_dump
from gmesh.stats.tap import TapHub
from gmesh.v1 import admin_pb2_grpc

__all__ = ["add_to_server"]


def _hub(service: str) -> TapHub | None:
    for outbound in stack.running():
        if outbound.snapshot.has_service(service):
            return outbound.mesh.taps
    return None


def _dump(only: str) -> dict[str, Any]:
    running = stack.running()
    if not running:
        return {"services": {}}
    return config_dump(running[0], {"application": True}, only)


def add_to_server(server: grpc.aio.Server) -> None:
    """Serve `gmesh.v1.Admin` (Tap, ConfigDump) for this process's channels on `server`."""
    admin_pb2_grpc.add_AdminServicer_to_server(_Admin(_dump, _hub), server)
