"""The access log: one JSON line per call in both doors, exact fields, per-service switch and
headers, and the example plugin's redaction and extra field (installed as a user would)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Door, Mesh, route, rule, split

from gmesh.stats import accesslog
from gmesh.v1 import echo_pb2

UNARY = "/gmesh.v1.Echo/Unary"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "access.log"
    accesslog.configure(str(path))
    yield path
    accesslog.configure("-")


def lines(path: Path) -> list[dict[str, Any]]:
    accesslog.sink().flush()
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_one_line_per_call_with_exact_fields(mesh: Mesh, door: Door, log_file: Path) -> None:
    await route(mesh, door, [rule("default", backends=split(50, 50))])
    revision = await mesh.put(
        "Telemetry",
        "log-orders",
        {"service": "orders", "accessLog": {"enabled": True, "headers": ["x-user"]}},
    )
    await door.wait(revision)
    request = echo_pb2.EchoRequest(message="hello")
    addresses = {s.name: s.address for s in mesh.servers.values()}
    answered = []
    for i in range(8):
        reply = await door.stub.Unary(request, metadata=(("x-user", f"u{i}"), ("x-other", "no")), timeout=10)
        answered.append(reply)
    with pytest.raises(grpc.aio.AioRpcError):
        await door.stub.Unary(echo_pb2.EchoRequest(fail_code=5), timeout=10)  # NOT_FOUND

    found = lines(log_file)
    assert len(found) == 9
    for i, (entry, reply) in enumerate(zip(found, answered, strict=False)):
        assert entry["door"] == door.name and entry["service"] == "orders" and entry["method"] == UNARY
        assert entry["route"] == "default" and entry["code"] == "OK" and entry["attempts"] == 1
        assert entry["endpoint"] == addresses[reply.server]
        assert entry["backend"] == f"orders/{reply.server[:2]}"
        assert entry["headers"] == {"x-user": f"u{i}"}  # only the headers the Telemetry names
        assert (entry["requestMessages"], entry["responseMessages"]) == (1, 1)
        assert entry["time"].endswith("Z") and 0 < entry["durationMs"] < 10_000
        if door.name == "proxy":
            assert entry["requestBytes"] == request.ByteSize()
            assert entry["responseBytes"] == reply.ByteSize()
            assert entry["caller"].startswith("ipv4:127.0.0.1:")
        else:
            assert entry["requestBytes"] is None and entry["responseBytes"] is None
    failed = found[-1]
    assert (failed["code"], failed["responseMessages"]) == ("NOT_FOUND", 0)
    # the example plugin (gmesh-owners) adds the owning team; no Owner names orders here
    assert all(entry["team"] is None for entry in found)


async def test_off_unless_a_telemetry_turns_it_on(mesh: Mesh, door: Door, log_file: Path) -> None:
    await route(mesh, door, [rule("default")])
    for _ in range(3):
        await door.stub.Unary(echo_pb2.EchoRequest(), timeout=10)
    assert lines(log_file) == []
    revision = await mesh.put("Telemetry", "mesh", {"accessLog": {"enabled": True, "samplePercent": 0}})
    await door.wait(revision)
    await door.stub.Unary(echo_pb2.EchoRequest(), timeout=10)
    assert lines(log_file) == []


async def test_streams_count_their_messages(mesh: Mesh, door: Door, log_file: Path) -> None:
    await route(mesh, door, [rule("default")])
    revision = await mesh.put("Telemetry", "mesh", {"accessLog": {"enabled": True}})
    await door.wait(revision)
    call = door.stub.Bidi(timeout=10)
    for i in range(5):
        await call.write(echo_pb2.EchoRequest(message=str(i)))
        await call.read()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    [entry] = lines(log_file)
    assert entry["method"] == "/gmesh.v1.Echo/Bidi" and entry["code"] == "OK"
    assert (entry["requestMessages"], entry["responseMessages"]) == (5, 5)
    if door.name == "proxy":
        assert entry["requestBytes"] == sum(echo_pb2.EchoRequest(message=str(i)).ByteSize() for i in range(5))
        assert entry["responseBytes"] > 0


async def test_the_redacting_plugin_keeps_credentials_out(mesh: Mesh, door: Door, log_file: Path) -> None:
    await route(mesh, door, [rule("default")])
    await mesh.put("Owner", "shop", {"team": "Shop", "contact": "shop@example.com", "services": ["orders"]})
    spec = {"accessLog": {"enabled": True, "headers": ["authorization", "x-session-token", "x-user"]}}
    await door.wait(await mesh.put("Telemetry", "mesh", spec))
    sent = (("authorization", "Bearer s3cret"), ("x-session-token", "s3cret-too"), ("x-user", "ann"))
    await door.stub.Unary(echo_pb2.EchoRequest(), metadata=sent, timeout=10)
    [entry] = lines(log_file)
    # authorization: gmesh's own rule; x-session-token: the example plugin's
    assert entry["headers"] == {
        "authorization": "<redacted>",
        "x-session-token": "<redacted>",
        "x-user": "ann",
    }
    assert "s3cret" not in json.dumps(entry)
    assert entry["team"] == "Shop"
