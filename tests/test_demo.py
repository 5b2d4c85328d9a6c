"""`gmesh demo`, the README's main job, on a machine with no etcd running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gmesh.store.embedded import EmbeddedEtcd


def test_demo_runs_end_to_end_and_stops_what_it_started(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GMESH_ETCD", "GMESH_PREFIX")}
    env["GMESH_DATA_DIR"] = str(tmp_path)
    try:
        result = subprocess.run(
            [sys.executable, "-P", "-m", "gmesh.cli", "demo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert "starting the embedded etcd" in out
        rows = [
            line.split() for line in out.splitlines() if line.startswith("orders ") and "version=" in line
        ]
        assert sorted(r[3] for r in rows) == ["version=v1", "version=v2"]  # SERVICE ADDRESS MTLS LABELS
        assert all(r[2] == "-" and r[4] == "gmesh.examples.v1.Orders" for r in rows)
        assert "served_by=v1" in out and "served_by=v2" in out
        calls = {(r[0], r[1]): int(r[3]) for r in (line.split() for line in out.splitlines()) if len(r) == 4
                 and r[0] in ("proxy", "channel")}  # fmt: skip
        assert calls == {
            ("proxy", "v1"): 50,
            ("proxy", "v2"): 50,
            ("channel", "v1"): 50,
            ("channel", "v2"): 50,
        }
        assert "orders has no endpoints" in out
        assert EmbeddedEtcd(tmp_path).status() is None  # the etcd it started is stopped again
    finally:
        EmbeddedEtcd(tmp_path).stop()
