"""Tap benchmark: what a `gmesh tap --bodies` open on a loaded proxy costs it, and whether the tap
keeps to its rate cap.

    python bench/tap.py [--rps 2000] [--seconds 5] [--reps 3]

Open-loop load from h2load (Debian package nghttp2-client) at --rps unary calls per second
through `gmesh proxy`, alternately untapped and with `gmesh tap echo --bodies` reading from the
proxy's admin port (default cap: 100 events/s). Prints, per run: calls/s achieved, the proxy's
CPU µs per call, and the events the tap received. Every process is separate and on 127.0.0.1;
everything it starts it stops.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dataplane import cpu_seconds, grpc_frame, mesh


def load(address: str, workdir: Path, rps: int, seconds: float) -> int:
    """h2load at `rps` for `seconds`; the calls that succeeded."""
    data = workdir / "request.bin"
    data.write_bytes(grpc_frame(100))
    out = subprocess.run(
        ["h2load", "-c", "4", "-m", "16", "--rps", str(rps // 4), "-D", str(int(seconds)), "-d", str(data),
         "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{address}/gmesh.v1.Echo/Unary"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )  # fmt: skip
    found = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out.stdout)
    assert found, out.stdout
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rps", type=int, default=2000, help="offered calls per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (untapped and tapped alternate)")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        sys.exit("h2load is missing (Debian: apt install nghttp2-client)")
    results: dict[str, list[tuple[float, float, int]]] = {"untapped": [], "tapped": []}
    with tempfile.TemporaryDirectory(prefix="gmesh-bench-") as tmp, mesh(Path(tmp)) as setup:
        workdir = Path(tmp)
        load(setup["proxy"], workdir, 500, 2)  # warm up: connections, caches
        for _ in range(args.reps):
            for kind in ("untapped", "tapped"):
                tap = None
                events_file = workdir / "events.jsonl"
                if kind == "tapped":
                    out = events_file.open("w")
                    tap = subprocess.Popen(
                        [sys.executable, "-P", "-m", "gmesh.cli", "tap", "echo", "--bodies", "--admin",
                         setup["admin"], "-o", "json"],
                        env=setup["env"], stdout=out, stderr=subprocess.PIPE, text=True,
                    )  # fmt: skip
                    assert tap.stderr is not None
                    while "tapping echo" not in tap.stderr.readline():  # said once its tap is open
                        if tap.poll() is not None:
                            raise RuntimeError("gmesh tap exited")
                cpu0 = cpu_seconds(setup["proxy_pid"])
                started = time.monotonic()
                done = load(setup["proxy"], workdir, args.rps, args.seconds)
                elapsed = time.monotonic() - started
                cpu = cpu_seconds(setup["proxy_pid"]) - cpu0
                events = 0
                if tap is not None:
                    tap.send_signal(signal.SIGINT)
                    tap.wait(10)
                    out.close()
                    events = len(events_file.read_text().splitlines())
                results[kind].append((done / args.seconds, cpu / done * 1e6, events))
                print(f"{kind:9} {done / args.seconds:7.0f} calls/s  proxy {cpu / done * 1e6:6.0f} µs/call  "
                      f"tap events {events} in {elapsed:.1f}s", file=sys.stderr)  # fmt: skip
    print(
        f"\n{time.strftime('%Y-%m-%d')}: h2load at {args.rps} calls/s offered, {args.reps} x {args.seconds:g}s, medians"
    )
    for kind, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        events = statistics.median(r[2] for r in runs)
        print(f"{kind:9} {rate:7.0f} calls/s  proxy CPU {cpu:6.0f} µs/call  tap events {events:.0f}")


if __name__ == "__main__":
    main()
