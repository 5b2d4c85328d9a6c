"""Running `gmesh proxy`: the outbound stack, inbound server, admin port, the proxy's own leased
record, graceful drain, and `--workers N` processes sharing one port.

Start-up serves as soon as the proxy can route: from etcd's snapshot, or — etcd not
answering within a fraction of a second — from the snapshot persisted by its last run,
while it keeps connecting to etcd in the background. Until it has either, its port is
bound (a second proxy on it fails at once) but it accepts no call it could not route.

Stop (SIGTERM) drains: NOT_SERVING on the admin port, the record withdrawn, then
`drain_delay` of normal service (callers and load balancers notice it is leaving), then no
new calls while calls in flight get `drain_timeout` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gmesh.chain.call import source_of
from gmesh.chain.replay import REPLAY_BUDGET
from gmesh.discovery.keys import MeshKeys
from gmesh.discovery.lease import LeasedKey
from gmesh.errors import AddressInUse, StoreUnavailable
from gmesh.outbound import stack
from gmesh.outbound.pool import EndpointPool, Profile
from gmesh.outbound.stack import Outbound
from gmesh.proxy.admin import AdminServer
from gmesh.proxy.server import ProxyServer
from gmesh.stats import accesslog, traces
from gmesh.store.etcd import EtcdConfig

if TYPE_CHECKING:
    from gmesh.metrics import MetricsServer
    from gmesh.proxy.sidecar import Sidecar
    from gmesh.security.identity import WorkloadIdentity

log = logging.getLogger(__name__)

RECORD_TTL = 10
#: The proxy record's revision is rewritten at most this often (every proxy writes it).
RECORD_MIN_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: str
    admin: str | None
    etcd: EtcdConfig
    keys: MeshKeys
    drain_timeout: float = 30.0
    #: on stop, how long the proxy keeps serving after leaving discovery and health
    drain_delay: float = 2.0
    max_message_bytes: int = 4 * 1024 * 1024
    snapshot_file: Path | None = None
    worker: int = 0
    workers: int = 1
    #: labels of the workload this proxy serves (a sidecar's app): routes match them as the caller's
    caller_labels: dict[str, str] = field(default_factory=dict)
    #: the zone of the workload this proxy serves (zone-aware balancing)
    zone: str = ""
    #: clients reconnect after this long (None: never), so connections rebalance over workers
    max_connection_age: float | None = None
    #: a service with no calls for this long has its connections closed (None: the default)
    idle_timeout: float | None = None
    #: bytes all retried streams of the process may keep for replay (None: the default)
    replay_budget: int | None = None
    #: HOST:PORT of the Prometheus `/metrics` HTTP endpoint (None: off); worker i adds i to the port
    metrics: str | None = None
    #: where access log lines go (a path, `-` for stderr; None: GMESH_ACCESS_LOG or stderr)
    access_log: str | None = None
    #: the mesh service this proxy's calls present (mTLS to endpoints that offer it)
    identity: str | None = None
    #: a join token for the identity's first certificate (None: GMESH_JOIN_TOKEN or the local token)
    token: str | None = None
    #: sidecar mode: the app's plaintext HOST:PORT, the service it serves, where mTLS is served,
    #: and (PERMISSIVE) where plaintext is served
    inbound: str | None = None
    service: str | None = None
    listen_tls: str | None = None
    listen_plain: str | None = None


class RunningProxy:
    """A started proxy; `stop()` drains it. Used by `gmesh proxy`, `gmesh demo` and tests."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.outbound: Outbound
        self.pool: EndpointPool
        self.server: ProxyServer
        self.admin: AdminServer | None = None
        self.metrics: MetricsServer | None = None
        self.identity: WorkloadIdentity | None = None
        self.sidecar: Sidecar | None = None
        self.record: LeasedKey | None = None
        self.id = ""
        self.serving = False
        self._record_task: asyncio.Task[None] | None = None
        self._record_dirty = asyncio.Event()
        self._unlisten: Callable[[], None] | None = None
        self._opening: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def catalog(self) -> Any:
        return self.outbound.catalog

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.server.address,
            "admin": self.admin.address if self.admin else "",
            "adminTls": bool(self.admin and self.admin.tls),
            "metrics": self.metrics.address if self.metrics else "",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "worker": self.settings.worker,
            "workers": self.settings.workers,
            "revision": self.outbound.revision,
            "identity": self.identity.spiffe_id if self.identity is not None else None,
            "inbound": self.sidecar.tls_address if self.sidecar is not None else None,
            "source": self.outbound.snapshot.source,
            "serving": self.serving,
            "startedAt": self.started_at,
        }

    def dump_info(self) -> dict[str, Any]:
        """`info()` plus what the config dump shows of this proxy's identity and inbound side."""
        out = self.info()
        if self.identity is not None:
            out["identityState"] = self.identity.describe()
        if self.sidecar is not None:
            out["inboundState"] = self.sidecar.describe()
        return out

    async def start(self, *, wait_for_snapshot: float = 5.0) -> None:
        s = self.settings
        reuse = s.workers > 1
        if not reuse:
            check_free(s.listen)
        if s.replay_budget is not None:
            REPLAY_BUDGET.limit = s.replay_budget
        if s.access_log is not None:
            accesslog.configure(s.access_log)
        if traces.configure_from_env("gmesh-proxy"):
            log.info("exporting traces to the OTLP collector the OTEL_* variables name")
        self.outbound = await stack.acquire(
            s.etcd,
            s.keys,
            persist_path=s.snapshot_file,
            idle_timeout=s.idle_timeout,
            drain_timeout=s.drain_timeout,
            wait=wait_for_snapshot,
        )
        try:
            who = s.identity or (s.service if s.inbound else None)
            if who is not None:
                from gmesh.security import identity as identities

                self.identity = await identities.acquire(
                    self.outbound.store, s.keys, who, mesh=s.etcd.describe(), token=s.token
                )
            self.pool = self.outbound.pool(
                Profile(max_message_bytes=s.max_message_bytes, identity=self.identity)
            )
            self.server = ProxyServer(
                self.outbound,
                self.pool,
                s.listen,
                max_message_bytes=s.max_message_bytes,
                caller_labels=s.caller_labels,
                zone=s.zone,
                max_connection_age=s.max_connection_age,
                reuse_port=reuse,
            )
            if self.identity is not None:
                self.server.inbound.caller_identity = self.identity.spiffe_id
            if s.inbound:
                from gmesh.proxy.sidecar import Sidecar

                assert self.identity is not None and s.service and s.listen_tls
                self.sidecar = Sidecar(
                    self.outbound, self.identity, s.service, s.inbound, s.listen_tls,
                    listen_plain=s.listen_plain, max_message_bytes=s.max_message_bytes,
                    labels=s.caller_labels, zone=s.zone,
                )  # fmt: skip
            port = self.server.address.rpartition(":")[2]
            self.id = f"{socket.gethostname()}:{port}#{s.worker}@{os.getpid()}"
            self.outbound.role, self.outbound.role_id = "proxy", self.id
            # the service graph's name for callers of this proxy: its identity's service, its
            # caller labels' service/app, else the proxy itself (a plain client we cannot name)
            self.server.inbound.source = source_of(
                self.server.inbound.caller_identity, s.caller_labels, f"proxy:{self.id}"
            )
            if s.admin:
                self.admin = AdminServer(
                    self.outbound, s.admin, self.dump_info, reuse_port=reuse, identity=self.identity
                )
                await self.admin.start()
            if s.metrics:
                host, _, port_text = s.metrics.rpartition(":")
                host = host.strip("[]")  # [::1]:9464
                metrics_port = int(port_text) + s.worker if int(port_text) else 0
                from gmesh.metrics import process_registry, serve

                self.metrics = serve(metrics_port, host, process_registry())
        except BaseException:
            if self.admin is not None:
                await self.admin.stop()
            if self.identity is not None:
                from gmesh.security import identity as identities

                await identities.release(self.identity)
            await stack.release(self.outbound)
            raise
        self._unlisten = self.outbound.on_change(self._state_changed)
        if self.outbound.snapshot.source != "empty":
            await self._open()
        else:
            log.warning(
                "no snapshot yet (etcd unreachable, nothing persisted): accepting no calls until one arrives"
            )
        self._record_task = asyncio.get_running_loop().create_task(self._keep_record())

    def _state_changed(self, outbound: Outbound) -> None:
        self._record_dirty.set()
        if not self.serving and self._opening is None and outbound.snapshot.source != "empty":
            # the first snapshot (from etcd or the persisted file): start accepting calls
            self._opening = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        """Accept calls (the port was bound at start) and turn health SERVING."""
        await self.server.start()
        if self.sidecar is not None:
            await self.sidecar.start()
        self.serving = True
        self._record_dirty.set()
        if self.admin is not None:
            await self.admin.set_serving(True)

    async def _keep_record(self) -> None:
        """Publish this proxy under proxies/ (leased) with the revision it serves; retry if etcd is away."""
        key = self.settings.keys.proxy(self.id)
        while self.record is None:
            try:
                record = LeasedKey(self.outbound.store, key, RECORD_TTL)
                await record.open()
                self.record = record
            except StoreUnavailable as exc:
                log.warning("proxy record not written yet: %s", exc)
                await asyncio.sleep(2.0)
        while True:
            try:
                await self.record.put(json.dumps(self.info(), sort_keys=True).encode())
            except StoreUnavailable as exc:
                log.warning("proxy record not updated: %s", exc)
                await asyncio.sleep(2.0)
                continue
            self._record_dirty.clear()
            await self._record_dirty.wait()
            await asyncio.sleep(RECORD_MIN_INTERVAL)

    async def stop(self, drain: float | None = None, *, delay: float | None = None) -> None:
        """Graceful drain: leave discovery and health first, keep serving `delay` seconds (default:
        the configured drain delay), then stop accepting calls and let calls in flight finish
        within `drain` seconds (default: the configured drain timeout), then cancel them."""
        grace = self.settings.drain_timeout if drain is None else drain
        pause = self.settings.drain_delay if delay is None else delay
        if self.admin is not None:
            await self.admin.set_serving(False)
        if self._record_task is not None:
            self._record_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._record_task
        if self.record is not None:
            await self.record.close()
        if self._unlisten is not None:
            self._unlisten()
        if self.sidecar is not None:
            await self.sidecar.withdraw()
        if self.serving and pause > 0:
            await asyncio.sleep(pause)  # still serving: whoever routes here notices we left
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self.sidecar is not None:
            await self.sidecar.stop(grace)
        await self.server.stop(grace)
        if self.admin is not None:
            await self.admin.stop()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        await self.outbound.release_pool(self.pool, 0)
        if self.identity is not None:
            from gmesh.security import identity as identities

            await identities.release(self.identity)
        await stack.release(self.outbound)
        await asyncio.to_thread(traces.flush)


def check_free(listen: str) -> None:
    """Fail with one clear line when `listen` is taken, before grpc tries (and logs its own)."""
    host, _, port = listen.rpartition(":")
    if port == "0":
        return
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc's own sockets
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"cannot listen on {listen}: the address is in use (another gmesh proxy, or another "
                    "program); pick another --listen, or stop the other one"
                ) from None
            raise AddressInUse(f"cannot listen on {listen}: {exc.strerror}") from None


async def serve(settings: ProxySettings, *, announce: Callable[[RunningProxy], None] | None = None) -> None:
    """Run one proxy until SIGTERM or SIGINT, then drain it."""
    proxy = RunningProxy(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    if announce is not None:
        announce(proxy)
    await stop.wait()
    log.info(
        "leaving: %.1fs of service after withdrawing, then draining (up to %.0fs)",
        settings.drain_delay,
        settings.drain_timeout,
    )
    await proxy.stop()


def _lock_path(listen: str) -> Path:
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in listen)
    return Path(tempfile.gettempdir()) / f"gmesh-proxy-{name}.lock"


def hold_port(listen: str) -> IO[bytes]:
    """`--workers`: make sure the port is free and stays ours. Workers share it with SO_REUSEPORT,
    which any other process of the same user could join too: a lock held for as long as the
    supervisor runs keeps a second `gmesh proxy --workers` off it, and a probe bind (with
    SO_REUSEPORT, as the workers bind) fails on a port a single proxy or another program holds."""
    lock = open(_lock_path(listen), "ab")  # noqa: SIM115 - held until the supervisor exits
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise AddressInUse(
            f"cannot listen on {listen}: another `gmesh proxy --workers` already serves it"
        ) from None
    host, _, port = listen.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError:
            lock.close()
            raise AddressInUse(
                f"cannot listen on {listen}: the address is in use (another gmesh proxy, or another program)"
            ) from None
    return lock


def supervise(argv: Sequence[str], workers: int, listen: str) -> int:
    """`--workers N`: run N copies of this proxy sharing the port (SO_REUSEPORT) and pass
    SIGTERM/SIGINT on to them. A worker that dies is started again."""
    lock = hold_port(listen)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    # The workers' rate-limit buckets, shared (memory-mapped files; in RAM where /dev/shm is):
    # together they admit what one process would.
    from gmesh.ratelimit.bucket import SHARED_DIR_ENV

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    shared = tempfile.mkdtemp(prefix="gmesh-limits-", dir=shm)
    env = {**os.environ, SHARED_DIR_ENV: shared}

    def launch(index: int) -> None:
        cmd = [sys.executable, "-P", "-m", "gmesh.cli", *argv, "--worker-index", str(index)]
        procs[index] = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        return _run_workers(procs, launch, workers, lambda: stopping)
    finally:
        lock.close()
        import shutil

        shutil.rmtree(shared, ignore_errors=True)


def _run_workers(
    procs: dict[int, subprocess.Popen[bytes]], launch: Callable[[int], None], workers: int,
    stopping: Callable[[], bool],
) -> int:  # fmt: skip
    for index in range(workers):
        launch(index)
    failed = 0
    while procs:
        try:
            pid, status = os.wait()  # signals run `forward`, then the wait resumes
        except ChildProcessError:
            break
        ended = next((i for i, p in procs.items() if p.pid == pid), None)
        if ended is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        procs.pop(ended).returncode = code
        if not stopping():
            failed += 1
            print(f"gmesh proxy: worker {ended} exited ({code}); starting it again", file=sys.stderr)
            time.sleep(1.0)
            launch(ended)
    return 0
