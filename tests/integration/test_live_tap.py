"""`gmesh tap`: live calls from a proxy's admin port and from an application's `gmesh.admin`, exact
events, redaction by the installed example plugin, bodies decoded in the CLI, and every bound."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from conftest import Mesh, rule, start_proxy

import gmesh.admin
import gmesh.aio
from gmesh import hookimpl
from gmesh.discovery.keys import MeshKeys
from gmesh.pluginmanager import Plugins
from gmesh.stats.tap import MAX_TAPS
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import admin_pb2, admin_pb2_grpc, echo_pb2, echo_pb2_grpc

UNARY = "/gmesh.v1.Echo/Unary"
SECRET = (("authorization", "Bearer s3cret"), ("x-user", "ann"))


class ScrubSecrets:
    """A plugin that masks the secret wherever a tapped body carries it (the Echo upstream echoes
    request headers back in its response): same length, so the message still decodes."""

    @hookimpl
    def gmesh_redact_bodies(self) -> list[Any]:
        return [lambda service, method, direction, body: body.replace(b"s3cret", b"******")]


@pytest.fixture
def scrubbing() -> Iterator[None]:
    plugins = Plugins.load()
    plugin = ScrubSecrets()
    plugins.pm.register(plugin, name="scrub-secrets")
    yield
    plugins.pm.unregister(plugin)


@pytest_asyncio.fixture
async def tapped(
    mesh: Mesh, etcd_server: EtcdMember, mesh_keys: MeshKeys, tmp_path: Path, scrubbing: None
) -> AsyncIterator[Any]:
    await mesh.put("Route", "orders", {"service": "orders", "rules": [rule("default")]})
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path)
    await proxy.catalog.wait_for(
        lambda s: len(s.endpoints_of("orders")) == 3 and "orders" in s.routes, timeout=5
    )
    async with (
        grpc.aio.insecure_channel(proxy.address) as calls,
        grpc.aio.insecure_channel(proxy.info()["admin"]) as admin,
    ):
        yield proxy, echo_pb2_grpc.EchoStub(calls), admin_pb2_grpc.AdminStub(admin)
    await proxy.stop(0)


async def opened(admin: Any, **request: Any) -> Any:
    """A Tap call, once the proxy has opened the tap (its response headers came)."""
    call = admin.Tap(admin_pb2.TapRequest(service="orders", **request))
    if dict(await call.initial_metadata()).get("gmesh-tap") != "open":
        await call.read()  # refused: raises its status
    return call


async def test_tap_shows_each_call_with_redacted_metadata_and_bodies(tapped: Any, mesh: Mesh) -> None:
    _, stub, admin = tapped
    tap = await opened(admin, method=UNARY, bodies=True)
    replies = [
        await stub.Unary(echo_pb2.EchoRequest(message=f"m{i}"), metadata=SECRET, timeout=10) for i in range(5)
    ]
    await stub.Bidi(iter([echo_pb2.EchoRequest()]), timeout=10).read()  # another method: not tapped
    addresses = {s.name: s.address for s in mesh.servers.values()}
    for i, reply in enumerate(replies):
        event = await asyncio.wait_for(tap.read(), 10)
        assert (event.door, event.service, event.method, event.code) == ("proxy", "orders", UNARY, "OK")
        assert event.endpoint == addresses[reply.server] and event.route == "default"
        assert event.backend == "orders" and event.attempts == 1 and event.dropped == 0
        headers = {h.key: h.value for h in event.metadata}
        assert headers["authorization"] == "<redacted>" and headers["x-user"] == "ann"
        assert echo_pb2.EchoRequest.FromString(event.request).message == f"m{i}"
        # the upstream echoed the headers in its answer; the body redactor masked the secret
        assert "Bearer s3cret" in str(reply)
        masked = str(reply).replace("s3cret", "******")
        assert str(echo_pb2.EchoResponse.FromString(event.response)) == masked
        assert not event.truncated and event.request_messages == event.response_messages == 1
        assert b"s3cret" not in event.SerializeToString()
    tap.cancel()


async def test_bodies_are_cut_and_taps_are_limited(tapped: Any) -> None:
    _, stub, admin = tapped
    taps = [await opened(admin, bodies=True, max_body_bytes=8)]
    await stub.Unary(echo_pb2.EchoRequest(payload=b"x" * 100), timeout=10)
    event = await asyncio.wait_for(taps[0].read(), 10)
    assert event.truncated and len(event.request) == 8 and len(event.response) == 8
    taps += [await opened(admin) for _ in range(MAX_TAPS - 1)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await opened(admin)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    taps.pop().cancel()  # one closes: a new one opens
    await asyncio.wait_for(_until_open(admin), 10)
    for t in taps:
        t.cancel()


async def _until_open(admin: Any) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            (await opened(admin)).cancel()
            return
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, f"the admin port {admin} never opened a tap"
            await asyncio.sleep(0.05)


async def test_the_rate_cap_holds_and_every_skipped_call_is_counted(tapped: Any) -> None:
    _, stub, admin = tapped
    rate = 20
    tap = await opened(admin, max_rate=rate)
    events: list[Any] = []
    last_seen = asyncio.Event()

    async def reader() -> None:
        async for event in tap:
            events.append(event)
            if any(h.key == "x-last" for h in event.metadata):
                last_seen.set()

    reading = asyncio.create_task(reader())
    loop = asyncio.get_running_loop()
    started = loop.time()
    n = 600
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            await stub.Unary(echo_pb2.EchoRequest(), timeout=10)

    await asyncio.gather(*(worker() for _ in range(16)))
    elapsed = loop.time() - started
    # marked calls until one gets through: its event comes after every earlier one, and says how
    # many calls were skipped since the event before it
    marked = 0
    async with asyncio.timeout(10):
        while not last_seen.is_set():
            marked += 1
            await stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-last", str(marked)),), timeout=10)
            await asyncio.wait({asyncio.ensure_future(last_seen.wait())}, timeout=0.02)
    reading.cancel()
    first = next(i for i, e in enumerate(events) if any(h.key == "x-last" for h in e.metadata))
    k = int({h.key: h.value for h in events[first].metadata}["x-last"])
    unmarked = events[:first]
    print(f"tap rate cap: {n / elapsed:.0f} calls/s offered, {len(unmarked)} events in {elapsed:.2f}s")
    # the bucket starts full (one second of events) and refills at `rate` per second
    assert len(unmarked) <= rate * (elapsed + 1) + 1, (len(unmarked), elapsed)
    assert len(unmarked) < n / 4  # the cap did bite
    # every call up to the k-th marked one is an event or counted as skipped by the next event
    assert sum(1 + e.dropped for e in events[: first + 1]) == n + k


async def test_the_cli_decodes_bodies_through_reflection(tapped: Any, gmesh_env: dict[str, str]) -> None:
    proxy, stub, _ = tapped
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "gmesh.cli", "tap", "orders", "--bodies", "-n", "2",
        "--admin", proxy.info()["admin"], env=gmesh_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert cli.stderr is not None
    async with asyncio.timeout(30):
        while b"tapping orders" not in await cli.stderr.readline():
            pass

    # the CLI says so once its tap is open: the next two calls are the two it shows
    for _ in range(2):
        await stub.Unary(echo_pb2.EchoRequest(message="hello"), metadata=SECRET, timeout=10)
    out, _ = await asyncio.wait_for(cli.communicate(), 30)
    text = out.decode()
    assert cli.returncode == 0, text
    assert text.count(f" proxy {UNARY} OK ") == 2
    assert text.count('  > {"message":"hello"}') == 2
    assert '  < {"message":"hello","server":' in text
    assert "authorization=<redacted>" in text and "s3cret" not in text


async def test_an_application_serves_taps_of_its_channels(
    mesh: Mesh, etcd_server: EtcdMember, mesh_keys: MeshKeys, scrubbing: None
) -> None:
    server = grpc.aio.server()
    gmesh.admin.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with (
            gmesh.aio.channel("gmesh:///orders", etcd=etcd_server.url, prefix=mesh_keys.prefix) as channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as admin_channel,
        ):
            stub = echo_pb2_grpc.EchoStub(channel)
            await stub.Unary(echo_pb2.EchoRequest(), timeout=10)  # the channel's stack knows orders
            tap = await opened(admin_pb2_grpc.AdminStub(admin_channel), bodies=True)
            reply = await stub.Unary(echo_pb2.EchoRequest(message="app"), metadata=SECRET, timeout=10)
            event = await asyncio.wait_for(tap.read(), 10)
            assert (event.door, event.method, event.code) == ("channel", UNARY, "OK")
            assert echo_pb2.EchoRequest.FromString(event.request).message == "app"
            assert str(echo_pb2.EchoResponse.FromString(event.response)) == str(reply).replace(
                "s3cret", "******"
            )
            assert {h.key: h.value for h in event.metadata}["authorization"] == "<redacted>"
            assert b"s3cret" not in event.SerializeToString()
            tap.cancel()
    finally:
        await server.stop(None)
