"""What an open dashboard page costs: the dashboard's CPU, the bytes and updates each page gets,
and the etcd reads the dashboard makes, with 0, 1, 5 and 20 pages open.

    python bench/dashboard.py [--seconds 20] [--pages 0,1,5,20]

Runs `gmesh demo --keep` (its own embedded etcd in a temporary directory: orders v1/v2, a
proxy, 12 calls/s, a canary, and the dashboard in the same process), then opens N event streams
as browsers do (`/events?page=...`, half on the graph, half on the orders page) for --seconds
each round. Prints per round: the demo process's CPU (its traffic included: compare rounds),
updates and KiB/s each page received, and etcd Range requests per second (from etcd's own
metrics; the dashboard never calls a proxy, so that is everything it asks of the mesh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def etcd_ranges(etcd: str) -> float:
    text = urllib.request.urlopen(f"{etcd}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total") and 'grpc_method="Range"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def stream(host: str, port: int, page: str, stop: asyncio.Event, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /events?page={page} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    try:
        while not stop.is_set():
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.5)
            except TimeoutError:
                continue
            if not chunk:
                break
            counts[0] += len(chunk)
            counts[1] += chunk.count(b"event: main")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pages", default="0,1,5,20")
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="gmesh-bench-dash-")
    env = {k: v for k, v in os.environ.items() if k not in ("GMESH_ETCD", "GMESH_PREFIX")}
    env["GMESH_DATA_DIR"] = data
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gmesh.cli", "demo", "--keep", "--dashboard-listen", "127.0.0.1:0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    out = b""
    try:
        async with asyncio.timeout(90):
            while not re.search(rb"dashboard: http://", out):
                line = await proc.stdout.readline()
                assert line, out.decode()
                out += line
        etcd = re.search(rb"etcd listening on (\S+)", out)
        url = re.search(rb"dashboard: http://([\d.]+):(\d+)/", out)
        assert etcd and url, out.decode()
        etcd_url, host, port = etcd.group(1).decode(), url.group(1).decode(), int(url.group(2))
        drain = asyncio.create_task(proc.stdout.read())  # keep its pipe empty
        await asyncio.sleep(12)  # rates need a window of publishes first
        print(f"{'pages':>5} {'demo CPU':>9} {'updates/s/page':>15} {'KiB/s/page':>11} {'etcd Range/s':>13}")
        for n in [int(x) for x in args.pages.split(",")]:
            stop = asyncio.Event()
            counts = [[0, 0] for _ in range(n)]
            tasks = [
                asyncio.create_task(
                    stream(host, port, "/" if i % 2 == 0 else "/services/orders", stop, counts[i])
                )
                for i in range(n)
            ]
            await asyncio.sleep(1.0)  # first render of each page out of the way
            for c in counts:
                c[0] = c[1] = 0
            cpu0, ranges0, t0 = cpu_seconds(proc.pid), etcd_ranges(etcd_url), time.monotonic()
            await asyncio.sleep(args.seconds)
            cpu1, ranges1, t1 = cpu_seconds(proc.pid), etcd_ranges(etcd_url), time.monotonic()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            seconds = t1 - t0
            per_page_updates = sum(c[1] for c in counts) / max(n, 1) / seconds
            per_page_kib = sum(c[0] for c in counts) / max(n, 1) / seconds / 1024
            print(
                f"{n:>5} {100 * (cpu1 - cpu0) / seconds:>8.1f}% {per_page_updates:>15.2f} "
                f"{per_page_kib:>11.2f} {(ranges1 - ranges0) / seconds:>13.2f}"
            )
        drain.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)


if __name__ == "__main__":
    asyncio.run(main())
