"""Running `gmesh proxy`: catalog, outbound stack, inbound server, admin port, the proxy's own
leased record, graceful drain, and `--workers N` processes sharing one port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmesh.channel.endpoint import EndpointPool
from gmesh.channel.outbound import Outbound, OutboundState
from gmesh.discovery.catalog import Catalog
from gmesh.discovery.keys import MeshKeys
from gmesh.discovery.lease import LeasedKey
from gmesh.errors import StoreUnavailable
from gmesh.pluginmanager import Plugins
from gmesh.proxy.admin import AdminServer
from gmesh.proxy.server import ProxyServer
from gmesh.store.etcd import EtcdConfig, Store

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


class RunningProxy:
    """A started proxy; `stop()` drains it. Used by `gmesh proxy`, `gmesh demo` and tests."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.store: Store
        self.catalog: Catalog
        self.outbound: Outbound
        self.server: ProxyServer
        self.admin: AdminServer | None = None
        self.record: LeasedKey | None = None
        self.id = f"{socket.gethostname()}:{settings.listen.rpartition(':')[2]}#{settings.worker}"
        self._record_task: asyncio.Task[None] | None = None
        self._record_dirty = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.server.address

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.server.address,
            "admin": self.admin.address if self.admin else "",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "worker": self.settings.worker,
            "workers": self.settings.workers,
            "revision": self.outbound.state.snapshot.revision,
            "source": self.outbound.state.snapshot.source,
            "startedAt": self.started_at,
        }

    async def start(self, *, wait_for_snapshot: float = 5.0) -> None:
        s = self.settings
        plugins = Plugins.load()
        self.store = await Store.connect(s.etcd)
        self.catalog = Catalog(self.store, s.keys, plugins.config_kinds(), persist_path=s.snapshot_file)
        pool = EndpointPool(max_message_bytes=s.max_message_bytes, drain_timeout=s.drain_timeout)
        self.outbound = Outbound(self.catalog, plugins.filter_factories(), pool=pool)
        self.server = ProxyServer(
            self.outbound,
            s.listen,
            max_message_bytes=s.max_message_bytes,
            caller_labels=s.caller_labels,
            zone=s.zone,
            max_connection_age=s.max_connection_age,
        )
        if s.admin:
            self.admin = AdminServer(self.outbound, s.admin, self.info)
            await self.admin.start()
        self.outbound.on_change(self._state_changed)
        await self.catalog.start(wait=wait_for_snapshot)
        await self.server.start()
        if self.catalog.snapshot.source != "empty":
            if self._serving is None:
                self._serving = asyncio.get_running_loop().create_task(self._ready())
        else:
            log.warning(
                "no snapshot yet (etcd unreachable, nothing persisted): UNAVAILABLE until one arrives"
            )
        self._record_task = asyncio.get_running_loop().create_task(self._keep_record())

    def _state_changed(self, state: OutboundState) -> None:
        self._record_dirty.set()
        if self._serving is None and state.snapshot.source != "empty":
            # the first snapshot (from etcd or the persisted file): health turns SERVING
            self._serving = asyncio.get_running_loop().create_task(self._ready())

    async def _ready(self) -> None:
        if self.admin is not None:
            await self.admin.set_serving(True)

    async def _keep_record(self) -> None:
        """Publish this proxy under proxies/ (leased) with the revision it serves; retry if etcd is away."""
        key = self.settings.keys.proxy(self.id)
        while self.record is None:
            try:
                record = LeasedKey(self.store, key, RECORD_TTL)
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

    async def stop(self, drain: float | None = None) -> None:
        """Graceful drain: leave discovery and health first, stop accepting calls, let calls in
        flight finish within `drain` seconds (default: the configured drain timeout), then cancel."""
        grace = self.settings.drain_timeout if drain is None else drain
        if self.admin is not None:
            await self.admin.set_serving(False)
        if self._record_task is not None:
            self._record_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._record_task
        if self.record is not None:
            await self.record.close()
        await self.server.stop(grace)
        if self.admin is not None:
            await self.admin.stop()
        await self.outbound.close(0)
        await self.catalog.close()
        await self.store.close()


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
    log.info("draining (up to %.0fs)", settings.drain_timeout)
    await proxy.stop()


def supervise(argv: Sequence[str], workers: int) -> int:
    """`--workers N`: run N copies of this proxy sharing the port (SO_REUSEPORT) and pass
    SIGTERM/SIGINT on to them. A worker that dies is started again."""
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def launch(index: int) -> None:
        cmd = [sys.executable, "-P", "-m", "gmesh.cli", *argv, "--worker-index", str(index)]
        procs[index] = subprocess.Popen(cmd)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(workers):
        launch(index)
    while procs:
        try:
            pid, status = os.wait()  # signals run `forward`, then the wait resumes
        except ChildProcessError:
            break
        ended = next((i for i, p in procs.items() if p.pid == pid), None)
        if ended is None:
            continue
        procs.pop(ended).returncode = os.waitstatus_to_exitcode(status)
        if not stopping:
            print(f"gmesh proxy: worker {ended} exited ({status}); starting it again", file=sys.stderr)
            time.sleep(1.0)
            launch(ended)
    return 0
