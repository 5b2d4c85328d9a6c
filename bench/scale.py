"""Scale benchmark: a mesh of 10,000 endpoints in 100 services, of which one is called.

    python bench/scale.py [--services 100] [--per-service 100] [--idle 10] [--runs 5]

Starts one etcd member on 127.0.0.1, a process serving `echo` on `--per-service` ports
(registered as its endpoints), and `--services - 1` other services of `--per-service`
endpoints each on closed loopback ports (nobody calls them; unreachable endpoints of
unused services must cost nothing). Then measures, printing each number:

1. `gmesh proxy` started on that mesh: time to serve, then — before any call and after
   1,000 calls to `echo` — its CPU over `--idle` seconds of idleness (target <= 1% of a
   core), its RSS (target <= 100 MiB) and the TCP connections it holds to endpoints
   (target: only to `echo`'s, at most `--per-service`).
   Then `--made-up` (100,000) calls to method names never used before, through the proxy:
   its RSS before and after (target: grows <= 20 MiB), and a real call after them.
2. A new `gmesh.aio.channel("gmesh:///echo")` in a fresh process: from creating it to its
   first answered call (target <= 300 ms; Python's own imports are not counted), `--runs`
   times; and a second channel in a process that already has one.
3. 50 channels in one process calling 5 services of 10 endpoints each: connections held
   (target <= 50).

A Route change to one service in use by 10 watching processes in this mesh is measured by
`python bench/propagation.py --no-baseline --filler-services 99` (target p99 <= 25 ms).
Everything binds 127.0.0.1; everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PREFIX = "/gmesh-bench-scale/"


# --------------------------------------------------------------------------- /proc readings


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def connections(pid: int, ports: set[int]) -> int:
    """Established TCP connections of process `pid` whose remote port is in `ports` (loopback)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                remote, state, inode = parts[2], parts[3], parts[9]
                if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) in ports:
                    found += 1
    return found


def idle_cpu(pid: int, seconds: float) -> float:
    """Share of one core process `pid` used over `seconds` of waiting."""
    start = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - start) / seconds


# --------------------------------------------------------------------------- the mesh


async def _serve(count: int) -> None:
    """`--serve N`: N Echo servers in this process, one port each; print their addresses."""
    from gmesh.testing.echo import start_echo_server

    servers = [await start_echo_server(f"echo-{i}") for i in range(count)]
    print(" ".join(s.address for s in servers), flush=True)
    with contextlib.suppress(Exception):
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    for s in servers:
        await s.stop(None)


async def _register(etcd: str, service: str, addresses: list[str], grpc_service: str, methods: Any) -> None:
    """Endpoint records as `gmesh.register` writes them (no lease: the bench deletes its prefix)."""
    from types import MappingProxyType

    from gmesh.discovery.endpoint import Endpoint
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import EtcdConfig, Put, Store

    keys = MeshKeys(PREFIX)
    store = await Store.connect(EtcdConfig.parse(etcd))
    try:
        ops = []
        for address in addresses:
            endpoint = Endpoint(
                service,
                address,
                labels=MappingProxyType({"version": "v1"}),
                grpc_services=(grpc_service,),
                methods=MappingProxyType(methods),
                grpc_services_from="reflection",
                registered_at=time.time(),
            )
            ops.append(Put(keys.endpoint(service, address), endpoint.to_json()))
        for i in range(0, len(ops), 1000):
            await store.txn([], ops[i : i + 1000])
    finally:
        await store.close()


async def _filler(etcd: str, services: int, per_service: int) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from propagation import load_filler

    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import EtcdConfig, Store

    store = await Store.connect(EtcdConfig.parse(etcd))
    try:
        return await load_filler(store, MeshKeys(PREFIX), services, per_service)
    finally:
        await store.close()


def echo_methods() -> dict[str, Any]:
    from gmesh.discovery.endpoint import MethodKind

    return {
        "/gmesh.v1.Echo/Unary": MethodKind.UNARY,
        "/gmesh.v1.Echo/ServerStream": MethodKind.SERVER_STREAMING,
        "/gmesh.v1.Echo/ClientStream": MethodKind.CLIENT_STREAMING,
        "/gmesh.v1.Echo/Bidi": MethodKind.BIDI_STREAMING,
    }


@contextlib.contextmanager
def echo_fleet(count: int, env: dict[str, str]) -> Iterator[list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-P", __file__, "--serve", str(count)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().split()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- channel timings


async def _first_call(etcd: str, service: str, second: bool) -> None:
    """`--first-call`: print seconds from creating a channel to its first answered call."""
    import gmesh.aio
    from gmesh.v1 import echo_pb2, echo_pb2_grpc

    request = echo_pb2.EchoRequest(message="x")
    t0 = time.perf_counter()
    channel = gmesh.aio.channel(f"gmesh:///{service}", etcd=etcd, prefix=PREFIX)
    await echo_pb2_grpc.EchoStub(channel).Unary(request, timeout=10)
    first = time.perf_counter() - t0
    result = {"first": first}
    if second:
        t1 = time.perf_counter()
        other = gmesh.aio.channel(f"gmesh:///{service}", etcd=etcd, prefix=PREFIX)
        await echo_pb2_grpc.EchoStub(other).Unary(request, timeout=10)
        result["second"] = time.perf_counter() - t1
        await other.close()
    await channel.close()
    print(json.dumps(result), flush=True)


async def _many_channels(etcd: str, services: list[str], per_service: int, ports: list[int]) -> None:
    """`--many-channels`: 50 channels over `services`, calls on each; print connections held."""
    import gmesh.aio
    from gmesh.v1 import echo_pb2, echo_pb2_grpc

    channels = [
        gmesh.aio.channel(f"gmesh:///{services[i % len(services)]}", etcd=etcd, prefix=PREFIX)
        for i in range(50)
    ]
    stubs = [echo_pb2_grpc.EchoStub(c) for c in channels]
    for _ in range(3):  # every channel several times: round robin visits its service's endpoints
        await asyncio.gather(
            *(s.Unary(echo_pb2.EchoRequest(), timeout=10) for s in stubs for _ in range(per_service))
        )
    held = connections(os.getpid(), set(ports))
    for c in channels:
        await c.close()
    print(json.dumps({"channels": len(channels), "connections": held}), flush=True)


def run_json(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-P", __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def made_up_names(address: str, count: int) -> tuple[float, str]:
    """`count` unary calls, each to a method name never used before: a third naming the service
    in `x-gmesh-service`, a third a known gRPC service with a made-up method, a third a made-up
    gRPC service. 50 at a time. Seconds taken and the codes seen."""
    import collections

    import grpc
    import grpc.aio

    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:

        async def one(i: int) -> None:
            if i % 3 == 0:
                method, metadata = f"/made.up{i}.Svc/M", (("x-gmesh-service", "echo"),)
            elif i % 3 == 1:
                method, metadata = f"/gmesh.v1.Echo/Made{i}", ()
            else:
                method, metadata = f"/made.up{i}.Svc/M", ()
            try:
                await channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        start = time.perf_counter()
        for first in range(0, count, 50):
            await asyncio.gather(*(one(i) for i in range(first, min(first + 50, count))))
    return time.perf_counter() - start, ", ".join(f"{n:,} {c}" for c, n in codes.most_common())


async def echo_once(address: str) -> str:
    import grpc.aio

    from gmesh.v1 import echo_pb2, echo_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(message="x"), timeout=10)
    return f"answered by {reply.server}"


# --------------------------------------------------------------------------- main


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def bench(args: argparse.Namespace) -> None:
    import grpc

    from gmesh.store.embedded import free_port
    from gmesh.testing.etcd import single_member
    from gmesh.v1 import echo_pb2, echo_pb2_grpc

    with tempfile.TemporaryDirectory(prefix="gmesh-bench-") as tmp:
        workdir = Path(tmp)
        member = single_member(workdir)
        member.start()
        env = {**os.environ, "GMESH_ETCD": member.url, "GMESH_PREFIX": PREFIX, "GMESH_DATA_DIR": tmp}
        proxy: subprocess.Popen[str] | None = None
        try:
            with echo_fleet(args.per_service, env) as echo:
                asyncio.run(_register(member.url, "echo", echo, "gmesh.v1.Echo", echo_methods()))
                filler = asyncio.run(_filler(member.url, args.services - 1, args.per_service))
                total = filler + len(echo)
                print(
                    f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs, Python "
                    f"{platform.python_version()}"
                )
                print(
                    f"mesh: {total} endpoints in {args.services} services; `echo` ({len(echo)} endpoints, "
                    f"one process) is the one called, the others are closed loopback ports\n"
                )
                echo_ports = {port_of(a) for a in echo}

                # 1. the proxy
                listen = f"127.0.0.1:{free_port()}"
                t0 = time.monotonic()
                proxy = subprocess.Popen(
                    [sys.executable, "-P", "-m", "gmesh.cli", "proxy", "--listen", listen, "--admin", ""],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                assert proxy.stderr is not None
                while "gmesh proxy listening" not in proxy.stderr.readline():
                    if proxy.poll() is not None:
                        raise RuntimeError("gmesh proxy exited")
                started = time.monotonic() - t0
                time.sleep(1.0)  # let start-up settle before measuring idleness
                before = idle_cpu(proxy.pid, args.idle)
                print("gmesh proxy")
                print(f"  started (process start to listening, imports included): {started * 1000:.0f} ms")
                print(
                    f"  idle before any call: {before:.2%} of a core over {args.idle:g} s, RSS "
                    f"{rss_mib(proxy.pid):.1f} MiB, {connections(proxy.pid, echo_ports)} connections to echo"
                )

                async def calls() -> float:
                    async with grpc.aio.insecure_channel(listen) as ch:
                        stub = echo_pb2_grpc.EchoStub(ch)
                        t = time.perf_counter()
                        for _ in range(20):
                            await asyncio.gather(
                                *(stub.Unary(echo_pb2.EchoRequest(), timeout=10) for _ in range(50))
                            )
                        return time.perf_counter() - t

                took = asyncio.run(calls())
                etcd_port = port_of(member.url.rsplit("/", 1)[-1])
                all_ports = (echo_ports | set(range(20000, 60000))) - {etcd_port}
                print(f"  1,000 calls to echo through it: {took:.2f} s")
                time.sleep(1.0)
                after = idle_cpu(proxy.pid, args.idle)
                rss = rss_mib(proxy.pid)
                to_echo = connections(proxy.pid, echo_ports)
                to_any = connections(proxy.pid, all_ports)
                print(
                    f"  idle after the calls: {after:.2%} of a core over {args.idle:g} s (target <= 1%), "
                    f"RSS {rss:.1f} MiB (target <= 100)"
                )
                print(
                    f"  connections: {to_echo} to echo's {len(echo)} endpoints, {to_any - to_echo} to the "
                    f"{filler} endpoints of the other services (target: 0)"
                )
                if args.made_up:
                    rss_before = rss_mib(proxy.pid)
                    took, codes = asyncio.run(made_up_names(listen, args.made_up))
                    served = asyncio.run(echo_once(listen))
                    print(
                        f"  {args.made_up:,} made-up method names through it ({codes}) in {took:.0f} s: "
                        f"RSS {rss_before:.1f} -> {rss_mib(proxy.pid):.1f} MiB (target: grows <= 20), "
                        f"then a real call: {served}"
                    )
                proxy.terminate()
                proxy.wait(30)
                proxy = None

                # 2. a new channel's first call
                firsts, seconds = [], []
                for _ in range(args.runs):
                    r = run_json(["--first-call", member.url, "echo", "--second"], env)
                    firsts.append(r["first"])
                    seconds.append(r["second"])
                print("\ngmesh.aio.channel('gmesh:///echo')")
                print(
                    f"  new channel, fresh process, creation -> first answer: median "
                    f"{statistics.median(firsts) * 1000:.0f} ms, max {max(firsts) * 1000:.0f} ms over "
                    f"{args.runs} runs (target <= 300 ms)"
                )
                print(
                    f"  second channel in the same process: median {statistics.median(seconds) * 1000:.1f} ms, "
                    f"max {max(seconds) * 1000:.1f} ms"
                )

            # 3. 50 channels, 5 services of 10 endpoints
            with echo_fleet(50, env) as fleet:
                services = [f"five-{i}" for i in range(5)]
                for i, service in enumerate(services):
                    asyncio.run(
                        _register(
                            member.url, service, fleet[i * 10 : i * 10 + 10], "gmesh.v1.Echo", echo_methods()
                        )
                    )
                ports = [port_of(a) for a in fleet]
                r = run_json(
                    ["--many-channels", member.url, ",".join(services), "10", ",".join(map(str, ports))], env
                )
                print(
                    f"\n{r['channels']} channels in one process calling 5 services of 10 endpoints: "
                    f"{r['connections']} connections (target <= 50)"
                )
        finally:
            if proxy is not None:
                proxy.kill()
            member.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, default=100, help="services in the mesh (default 100)")
    parser.add_argument("--per-service", type=int, default=100, help="endpoints of each (default 100)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idleness measured (default 10)")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes timing a first call (default 5)")
    parser.add_argument(
        "--made-up", type=int, default=100_000, help="made-up method names sent through the proxy (0: skip)"
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first-call", nargs=2, metavar=("ETCD", "SERVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--second", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--many-channels", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
    elif args.first_call:
        asyncio.run(_first_call(*args.first_call, args.second))
    elif args.many_channels:
        etcd, services, per, ports = args.many_channels
        asyncio.run(_many_channels(etcd, services.split(","), int(per), [int(p) for p in ports.split(",")]))
    else:
        bench(args)


if __name__ == "__main__":
    main()
