"""The embedded etcd: started on demand, found through its state file, stopped, restarted with its data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gmesh.store.embedded import EmbeddedEtcd, is_healthy

# -P: run the installed gmesh, never a source checkout that happens to be the cwd
GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """No GMESH_ETCD: commands must fall back to the embedded etcd under a private data dir."""
    data = tmp_path / "data"
    clean = {k: v for k, v in os.environ.items() if k not in ("GMESH_ETCD", "GMESH_PREFIX")}
    yield {**clean, "GMESH_DATA_DIR": str(data)}
    EmbeddedEtcd(data).stop()


def gmesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GMESH, *args], env=env, capture_output=True, text=True, timeout=60)


def test_start_status_stop_and_restart_keep_ports_and_data(env: dict[str, str]) -> None:
    etcd = EmbeddedEtcd(Path(env["GMESH_DATA_DIR"]))
    assert etcd.status() is None
    state, started = etcd.start()
    assert started and is_healthy(state.client_url)
    assert json.loads(etcd.state_file.read_text())["pid"] == state.pid
    again, started_again = etcd.start()
    assert not started_again and again.pid == state.pid

    doc = Path(env["GMESH_DATA_DIR"]).parent / "svc.yaml"
    doc.write_text("kind: Service\nmetadata: {name: orders}\n")
    assert gmesh("apply", "-f", str(doc), env=env).returncode == 0

    stopped = etcd.stop()
    assert stopped is not None and stopped.pid == state.pid
    assert etcd.status() is None and not is_healthy(state.client_url)
    assert etcd.stop() is None

    restarted, _ = etcd.start()
    assert restarted.client_url == state.client_url  # same port: clients configured with it reconnect
    assert "orders" in gmesh("get", "service", env=env).stdout  # data survived


def test_commands_start_the_embedded_etcd_when_absent(env: dict[str, str]) -> None:
    status = gmesh("etcd", "status", env=env)
    assert status.returncode == 3 and "not running" in status.stdout
    listed = gmesh("get", "endpoints", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "no endpoints"
    status = gmesh("etcd", "status", env=env)
    assert status.returncode == 0 and "healthy" in status.stdout
    stop = gmesh("etcd", "stop", env=env)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert gmesh("etcd", "status", env=env).returncode == 3


def test_state_left_by_a_dead_process_is_ignored(env: dict[str, str]) -> None:
    etcd = EmbeddedEtcd(Path(env["GMESH_DATA_DIR"]))
    etcd.root.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    etcd.state_file.write_text(
        json.dumps(
            {
                "pid": int(dead.stdout),
                "client_url": "http://127.0.0.1:9",
                "client_port": 9,
                "peer_port": 10,
                "data_dir": str(etcd.member_dir),
                "log_file": str(etcd.log_file),
                "started_at": 0.0,
            }
        )
    )
    assert etcd.status() is None
    assert not etcd.state_file.exists()
    start = gmesh("etcd", "start", env=env)
    assert start.returncode == 0 and "started" in start.stdout
