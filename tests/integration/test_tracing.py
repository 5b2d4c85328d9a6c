"""One trace across application → `gmesh:///` channel → `gmesh proxy` → upstream, as a real OTLP
collector receives it (a TraceService over a real socket), every hop a process of its own; and a
dead collector that never slows or fails a call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

import gmesh
from gmesh.discovery.keys import MeshKeys
from gmesh.store.embedded import free_port
from gmesh.store.etcd import Store
from gmesh.v1 import echo_pb2, echo_pb2_grpc

HERE = Path(__file__).parent
GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]
KIND = trace_pb2.Span.SpanKind


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC trace collector that keeps what it gets: (service.name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[tuple[str, Any]]:
        return [(s, span) for s, span in self.spans if span.trace_id.hex() == trace_id]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    server = grpc.aio.server()
    found = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield found, f"http://127.0.0.1:{port}"
    await server.stop(None)


@contextlib.asynccontextmanager
async def process(*argv: str, env: dict[str, str], ready: bytes) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process, once it printed `ready` (on stdout or stderr); SIGTERM at the end."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while ready not in (line := await proc.stdout.readline()):
                assert line, f"{argv} exited before it was ready"
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)


async def put(store: Store, keys: MeshKeys, kind: str, name: str, spec: dict[str, Any]) -> None:
    doc = {"kind": kind, "metadata": {"name": name}, "spec": spec}
    await store.put(keys.config(kind, name), json.dumps(doc).encode())


def attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        v = a.value
        if v.HasField("array_value"):
            out[a.key] = [x.string_value for x in v.array_value.values]
        else:
            out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


async def test_one_trace_from_the_app_through_channel_and_proxy_to_the_upstream(
    receiver: tuple[Receiver, str], store: Store, mesh_keys: MeshKeys, gmesh_env: dict[str, str]
) -> None:
    spans, otlp = receiver
    env = {**gmesh_env, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    # the proxy's hop retries UNAVAILABLE; the upstream refuses every second call
    retry = {"attempts": 2, "on": ["UNAVAILABLE"], "backoff": {"base": "1ms", "max": "2ms"}}
    route = {"service": "echo", "rules": [{"name": "all", "retry": retry}]}
    await put(store, mesh_keys, "Route", "echo", route)
    # record two request headers on call spans; the example plugin (installed) redacts credentials
    await put(store, mesh_keys, "Telemetry", "mesh", {"tracing": {"headers": ["authorization", "x-user"]}})
    proxy_address = f"127.0.0.1:{free_port()}"
    upstream = [sys.executable, "-P", str(HERE / "traced_upstream.py"), "echo", "0.5"]
    proxy = [*GMESH, "proxy", "--listen", proxy_address, "--admin", "", "--drain-delay", "0s"]
    async with (
        process(*upstream, env=env, ready=b"registered"),
        process(*proxy, env=env, ready=b"gmesh proxy listening"),
        gmesh.register(
            proxy_address, service="edge", grpc_services=["gmesh.v1.Echo"], etcd=env["GMESH_ETCD"],
            prefix=mesh_keys.prefix, handle_sigterm=False, drain_delay=0,
        ),
    ):  # fmt: skip
        app = await asyncio.create_subprocess_exec(
            sys.executable, "-P", str(HERE / "traced_app.py"), "gmesh:///edge", "2", "x-gmesh-service=echo",
            "authorization=Bearer s3cret", "x-user=alice", env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(app.communicate(), 60)
        assert app.returncode == 0
        (first, code1), (second, code2) = (line.split() for line in out.decode().splitlines())
        assert (code1, code2) == ("OK", "OK")  # the second call was refused once and retried
        deadline = time.monotonic() + 20
        while len(spans.of_trace(first)) < 6 or len(spans.of_trace(second)) < 8:
            assert time.monotonic() < deadline, (len(spans.of_trace(first)), len(spans.of_trace(second)))
            await asyncio.sleep(0.05)

    assert len(spans.of_trace(first)) == 6
    trace = spans.of_trace(second)
    assert len(trace) == 8
    by_id = {span.span_id: (service, span) for service, span in trace}

    def parent(span: Any) -> tuple[str, Any]:
        return by_id[span.parent_span_id]

    def one(service: str, kind: int) -> list[Any]:
        return [span for s, span in trace if s == service and span.kind == kind]

    [app_span] = [span for s, span in trace if s == "app" and span.name == "app-call-1"]
    [call] = [span for span in one("app", KIND.SPAN_KIND_INTERNAL) if span is not app_span]
    [channel_attempt] = one("app", KIND.SPAN_KIND_CLIENT)
    [proxy_server] = one("gmesh-proxy", KIND.SPAN_KIND_SERVER)
    proxy_attempts = sorted(
        one("gmesh-proxy", KIND.SPAN_KIND_CLIENT), key=lambda s: attrs(s)["gmesh.attempt"]
    )
    upstream_spans = one("upstream", KIND.SPAN_KIND_SERVER)
    assert len(proxy_attempts) == 2 and len(upstream_spans) == 2

    assert call.name == "gmesh.v1.Echo/Unary" and parent(call)[1] is app_span
    assert attrs(call)["rpc.system"] == "grpc" and attrs(call)["rpc.service"] == "gmesh.v1.Echo"
    assert attrs(call)["rpc.method"] == "Unary" and attrs(call)["gmesh.door"] == "channel"
    assert parent(channel_attempt)[1] is call
    assert attrs(channel_attempt)["gmesh.endpoint"] == proxy_address
    assert parent(proxy_server)[1] is channel_attempt  # the proxy continued the app's trace
    assert attrs(proxy_server)["gmesh.door"] == "proxy" and attrs(proxy_server)["gmesh.attempts"] == 2
    assert attrs(proxy_server)["gmesh.route"] == "all" and attrs(proxy_server)["rpc.grpc.status_code"] == 0
    failed, retried = proxy_attempts
    assert parent(failed)[1] is proxy_server and parent(retried)[1] is proxy_server  # siblings
    assert attrs(failed)["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failed.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert attrs(retried)["gmesh.attempt"] == 2 and attrs(retried)["gmesh.retry_reason"] == "UNAVAILABLE"
    assert attrs(retried)["rpc.grpc.status_code"] == 0
    # the stock server interceptor continued each attempt's trace
    assert {parent(span)[1].span_id for span in upstream_spans} == {failed.span_id, retried.span_id}
    # request headers on both doors' call spans, credentials redacted by the plugin
    for span in (call, proxy_server):
        assert attrs(span)["rpc.grpc.request.metadata.x-user"] == ["alice"]
        assert attrs(span)["rpc.grpc.request.metadata.authorization"] == ["<redacted>"]
    assert not any("s3cret" in str(attrs(span)) for _, span in trace)


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_a_dead_collector_never_fails_or_slows_a_call_and_its_drops_are_counted(
    store: Store, mesh_keys: MeshKeys, gmesh_env: dict[str, str]
) -> None:
    server = await _echo()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        **gmesh_env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": dead,
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    await put(store, mesh_keys, "Telemetry", "all", {"tracing": {"samplePercent": 100}})
    proxy_address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    argv = [
        *GMESH,
        "proxy",
        "--listen",
        proxy_address,
        "--admin",
        "",
        "--drain-delay",
        "0s",
        "--metrics",
        metrics,
    ]
    n = 500
    async with (
        gmesh.register(
            server[1], service="echo", etcd=env["GMESH_ETCD"], prefix=mesh_keys.prefix,
            handle_sigterm=False, drain_delay=0,
        ),
        process(*argv, env=env, ready=b"gmesh proxy listening"),
        grpc.aio.insecure_channel(proxy_address) as channel,
    ):  # fmt: skip
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Unary(echo_pb2.EchoRequest(), timeout=10, wait_for_ready=True)
        slowest = 0.0
        for _ in range(n):
            started = time.perf_counter()
            await stub.Unary(echo_pb2.EchoRequest(), timeout=10)  # raises on any failure
            slowest = max(slowest, time.perf_counter() - started)
        found = await asyncio.to_thread(scrape, metrics)
    await server[0].stop(None)
    # an export to a dead collector blocks its own thread for seconds (connect, retries with
    # backoff): a call that waited on it would take that long
    assert slowest < 1.0, slowest
    dropped = found[("gmesh_spans_dropped_total", (("reason", "queue_full"),))]
    assert found[("gmesh_spans_exported_total", ())] == 0
    # 2 spans per call (server, attempt), plus the first call's; at most one queue and one batch kept
    assert dropped >= 2 * (n + 1) - 64 - 32, dropped
    assert found[("gmesh_calls_total", tuple(sorted({
        "door": "proxy", "service": "echo", "route": "", "backend": "echo",
        "method": "/gmesh.v1.Echo/Unary", "code": "OK",
    }.items())))] == n + 1  # fmt: skip


async def _echo() -> tuple[Any, str]:
    from gmesh.testing.echo import start_echo_server

    server = await start_echo_server("up")
    return server, server.address
