"""A load process for the global rate-limit test: open-loop unary calls at RATE/s for SECONDS to
TARGET (a proxy's HOST:PORT, or gmesh:///SERVICE through a channel of its own), printing one JSON
line per wall-clock second of completions: {"second": epoch second, "OK": admitted,
"RESOURCE_EXHAUSTED": refused, ...} (a second may appear twice: add them up).

    python limit_load.py TARGET RATE SECONDS [ETCD PREFIX]
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from typing import Any

import grpc
import grpc.aio

import gmesh.aio
from gmesh.v1 import echo_pb2, echo_pb2_grpc


async def main(target: str, rate: float, seconds: float, etcd: str, prefix: str) -> None:
    if target.startswith("gmesh:///"):
        channel: Any = gmesh.aio.channel(target, etcd=etcd, prefix=prefix)
        await channel.channel_ready()
    else:
        channel = grpc.aio.insecure_channel(target)
    stub = echo_pb2_grpc.EchoStub(channel)
    loop = asyncio.get_running_loop()
    per_second: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    start = loop.time()
    print(json.dumps({"ready": True}), flush=True)

    async def one() -> None:
        try:
            await stub.Unary(echo_pb2.EchoRequest(message="x"), timeout=5)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        per_second[int(time.time())][code] += 1

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            now = int(time.time())
            for second in sorted(s for s in per_second if s < now - 1):  # complete seconds
                print(json.dumps({"second": second, **per_second.pop(second)}), flush=True)

    reporter = asyncio.ensure_future(report())
    tasks = []
    for i in range(int(rate * seconds)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    reporter.cancel()
    for second in sorted(per_second):
        print(json.dumps({"second": second, **per_second[second]}), flush=True)
    await channel.close()


if __name__ == "__main__":
    target, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    etcd, prefix = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else ("", "")
    asyncio.run(main(target, rate, seconds, etcd, prefix))
