"""Asking a gRPC server about itself: which services and methods it serves (server
reflection) and whether it is SERVING (`grpc.health.v1`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gmesh.discovery.endpoint import MethodKind

#: Services every server may expose that say nothing about what it is for; routing by
#: them would be ambiguous, so they never enter an endpoint record.
INFRASTRUCTURE_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
        "grpc.channelz.v1.Channelz",
        "grpc.admin.v1.Admin",
        "envoy.service.status.v3.ClientStatusDiscoveryService",
    }
)


@dataclass(frozen=True, slots=True)
class ServedApi:
    services: tuple[str, ...]
    methods: dict[str, MethodKind]


#: how to dial a server that serves only mutual TLS: (client credentials, its service name)
Secure = tuple[grpc.ChannelCredentials, str]


def _channel(address: str, secure: Secure | None) -> grpc.aio.Channel:
    if secure is None:
        return grpc.aio.insecure_channel(address)
    credentials, name = secure
    return grpc.aio.secure_channel(address, credentials, [("grpc.ssl_target_name_override", name)])


async def reflect(address: str, *, timeout: float = 3.0, secure: Secure | None = None) -> ServedApi | None:
    """The gRPC services and method kinds `address` serves, or None if it offers no reflection."""
    async with _channel(address, secure) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        try:
            async with asyncio.timeout(timeout):
                return await _reflect(stub)
        except (grpc.aio.AioRpcError, TimeoutError):
            return None


async def _reflect(stub: reflection_pb2_grpc.ServerReflectionStub) -> ServedApi:
    queue: asyncio.Queue[reflection_pb2.ServerReflectionRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        while (req := await queue.get()) is not None:
            yield req

    call = stub.ServerReflectionInfo(requests())
    try:
        queue.put_nowait(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        names = [
            s.name for s in listed.list_services_response.service if s.name not in INFRASTRUCTURE_SERVICES
        ]
        methods: dict[str, MethodKind] = {}
        for name in names:
            queue.put_nowait(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
            resp = await call.read()
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                methods.update(_methods_of(name, raw))
        return ServedApi(tuple(sorted(names)), methods)
    finally:
        queue.put_nowait(None)
        call.cancel()


async def file_descriptors(address: str, symbol: str, *, timeout: float = 3.0) -> list[bytes]:
    """The serialized file descriptors that define `symbol` (and what they import), by reflection."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        async with asyncio.timeout(timeout):
            call = stub.ServerReflectionInfo(iter([request]))
            found: list[bytes] = []
            async for response in call:
                found.extend(response.file_descriptor_response.file_descriptor_proto)
            return found


def _methods_of(service: str, raw: bytes) -> dict[str, MethodKind]:
    fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
    found: dict[str, MethodKind] = {}
    for svc in fd.service:
        full = f"{fd.package}.{svc.name}" if fd.package else svc.name
        if full != service:
            continue
        for m in svc.method:
            found[f"/{full}/{m.name}"] = MethodKind.of(m.client_streaming, m.server_streaming)
    return found


async def health(
    address: str, *, service: str = "", timeout: float = 2.0, secure: Secure | None = None
) -> str:
    """`SERVING`, `NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`, or `UNREACHABLE: <why>`."""
    async with _channel(address, secure) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return f"UNREACHABLE: {exc.code().name}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
