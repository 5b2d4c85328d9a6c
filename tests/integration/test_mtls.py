"""Mutual TLS on every hop, for real: a mesh CA over TLS, workload identities, an inbound proxy in
front of a server with no gmesh code, `gmesh:///` channels and an outbound proxy originating
mTLS, TLS modes, AuthorizationPolicies, and rotation under load with zero failed calls."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from conftest import start_proxy, until

import gmesh
import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.proxy.run import RunningProxy
from gmesh.security.ca import Root, cert_pem, key_pem, make_csr, new_key
from gmesh.security.identity import WorkloadIdentity
from gmesh.store.etcd import Store
from gmesh.testing.echo import EchoServicer
from gmesh.testing.etcd import EtcdMember
from gmesh.testing.mtls import RunningCa, running_ca
from gmesh.v1 import echo_pb2, echo_pb2_grpc

TD = "gmesh.local"
WEB = f"spiffe://{TD}/svc/web"

#: A gRPC server with no gmesh code at all (grpcio only, `python -I`): echoes raw request bytes.
BARE_APP = """
import asyncio, grpc
async def unary(request, context):
    return request
async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "gmesh.v1.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


@pytest_asyncio.fixture
async def ca(store: Store, mesh_keys: MeshKeys) -> AsyncIterator[RunningCa]:
    async with running_ca(store, mesh_keys, trust_domain=TD) as running:
        yield running


@pytest.fixture
def bare_app() -> Any:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", BARE_APP], stdout=subprocess.PIPE, text=True, cwd="/"
    )
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    assert port.isdigit(), "the bare app did not start"
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


async def put(store: Store, keys: MeshKeys, kind: str, name: str, spec: dict[str, Any]) -> int:
    doc = {"kind": kind, "metadata": {"name": name}, "spec": spec}
    return await store.put(keys.config(kind, name), json.dumps(doc).encode())


async def sidecar(
    etcd: EtcdMember, keys: MeshKeys, tmp_path: Path, ca: RunningCa, app: str, *, plain: bool = True
) -> RunningProxy:
    return await start_proxy(
        etcd, keys, tmp_path, inbound=app, service="echo", listen_tls="127.0.0.1:0",
        listen_plain="127.0.0.1:0" if plain else None, token=ca.local_token,
        snapshot_file=tmp_path / "sidecar-snapshot.json",
    )  # fmt: skip


async def wait_record(store: Store, keys: MeshKeys, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        kvs, _ = await store.get_prefix(keys.endpoints_of("echo"))
        records = [json.loads(kv.value) for kv in kvs]
        if len(records) == 1 and check(records[0]):
            return records[0]
        assert time.monotonic() < deadline, f"endpoint record never as expected: {records}"
        await asyncio.sleep(0.02)


REQUEST = echo_pb2.EchoRequest(payload=b"x" * 10, message="hi")


def leaf_credentials(root: Root, service: str, *, lifetime: float = 3600) -> grpc.ChannelCredentials:
    key = new_key()
    leaf = root.sign(
        make_csr(key, service, root.trust_domain), service, lifetime=datetime.timedelta(seconds=lifetime)
    )
    return grpc.ssl_channel_credentials(cert_pem(root.cert), key_pem(key), cert_pem(leaf))


async def unary(address: str, credentials: grpc.ChannelCredentials | None, name: str = "echo") -> Any:
    options = [("grpc.ssl_target_name_override", name)]
    channel = (
        grpc.aio.secure_channel(address, credentials, options)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        return await echo_pb2_grpc.EchoStub(channel).Unary(REQUEST, timeout=5)


async def refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await unary(address, credentials)
    return failed.value


async def test_strict_inbound_proxy_in_front_of_a_server_with_no_gmesh_code(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, tmp_path: Path, ca: RunningCa, bare_app: str
) -> None:
    await put(store, mesh_keys, "Service", "echo", {"tls": {"mode": "STRICT"}})
    await put(
        store, mesh_keys, "AuthorizationPolicy", "echo-for-web",
        {"service": "echo", "action": "ALLOW", "rules": [{"from": [WEB], "methods": ["/gmesh.v1.Echo/*"]}]},
    )  # fmt: skip
    side = await sidecar(etcd_server, mesh_keys, tmp_path, ca, bare_app)
    outbound = await start_proxy(
        etcd_server, mesh_keys, tmp_path, identity="web", token=ca.local_token,
        snapshot_file=tmp_path / "outbound-snapshot.json",
    )  # fmt: skip
    try:
        assert side.sidecar is not None
        tls = side.sidecar.tls_address
        plain = side.sidecar.plain_address
        # STRICT: the record offers only the TLS address
        record = await wait_record(store, mesh_keys, lambda r: r["address"] == tls)
        assert record["tls"] == tls
        # through gmesh:/// with identity web: mTLS, admitted, answered by the bare app
        async with gmesh.aio.channel(
            "gmesh:///echo",
            etcd=etcd_server.url,
            prefix=mesh_keys.prefix,
            identity="web",
            token=ca.local_token,
        ) as channel:
            answer = await echo_pb2_grpc.EchoStub(channel).Unary(REQUEST, timeout=5)
            assert answer.payload == REQUEST.payload
            assert channel.pool is not None and channel.pool.describe()["mtls"] == 1
        # through the outbound proxy with --identity web
        async with grpc.aio.insecure_channel(outbound.address) as channel:
            answer = await echo_pb2_grpc.EchoStub(channel).Unary(
                REQUEST, metadata=(("x-gmesh-service", "echo"),), timeout=5
            )
            assert answer.payload == REQUEST.payload
        # a valid identity no policy allows: PERMISSION_DENIED naming the policy
        async with gmesh.aio.channel(
            "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity="intruder",
            token=ca.local_token,
        ) as channel:  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await echo_pb2_grpc.EchoStub(channel).Unary(REQUEST, timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "echo-for-web" in (denied.value.details() or "") and "svc/intruder" in (
            denied.value.details() or ""
        )
        # plaintext to the TLS port: no handshake; plaintext to the plaintext port: UNAUTHENTICATED
        assert (await refused(tls, None)).code() == grpc.StatusCode.UNAVAILABLE
        strict = await refused(plain, None)
        assert strict.code() == grpc.StatusCode.UNAUTHENTICATED and "STRICT" in (strict.details() or "")
        # a certificate from another CA, and an expired one from this CA: the handshake fails
        other = Root.create(TD)
        assert (await refused(tls, leaf_credentials(other, "web"))).code() == grpc.StatusCode.UNAVAILABLE
        expired = leaf_credentials(ca.root, "web", lifetime=-30)
        assert (await refused(tls, expired)).code() == grpc.StatusCode.UNAVAILABLE
        # a valid one of this CA is admitted (the same handshake, to prove the two above are the cert)
        assert (await unary(tls, leaf_credentials(ca.root, "web"))).payload == REQUEST.payload
        # garbage bytes on the TLS port leave the proxy serving
        reader, writer = await asyncio.open_connection(*tls.rsplit(":", 1))
        writer.write(b"\x16\x03\x01\x00\x20 garbage, not a TLS hello" * 10)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        del reader
        assert (await unary(tls, leaf_credentials(ca.root, "web"))).payload == REQUEST.payload
        counts = side.sidecar.gate.counts
        assert counts[("mtls", "denied", "echo-for-web")] == 1
        assert counts[("plaintext", "refused", "")] == 1
        assert counts[("mtls", "allowed", "echo-for-web")] == 4
    finally:
        await outbound.stop(0)
        await side.stop(0)


async def test_permissive_serves_both_and_counts_each_disabled_offers_no_tls(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, tmp_path: Path, ca: RunningCa, bare_app: str
) -> None:
    side = await sidecar(etcd_server, mesh_keys, tmp_path, ca, bare_app)
    try:
        assert side.sidecar is not None
        tls, plain = side.sidecar.tls_address, side.sidecar.plain_address
        await wait_record(store, mesh_keys, lambda r: r["address"] == plain and r["tls"] == tls)
        for _ in range(3):
            assert (await unary(plain, None)).payload == REQUEST.payload
        for _ in range(2):
            assert (await unary(tls, leaf_credentials(ca.root, "web"))).payload == REQUEST.payload
        counts = side.sidecar.gate.counts
        assert counts[("plaintext", "allowed", "")] == 3 and counts[("mtls", "allowed", "")] == 2
        # DISABLED: the record offers plaintext only; a caller with an identity goes plaintext
        await put(store, mesh_keys, "Service", "echo", {"tls": {"mode": "DISABLED"}})
        await wait_record(store, mesh_keys, lambda r: r["address"] == plain and "tls" not in r)
        async with gmesh.aio.channel(
            "gmesh:///echo",
            etcd=etcd_server.url,
            prefix=mesh_keys.prefix,
            identity="web",
            token=ca.local_token,
        ) as channel:
            await channel.ready_outbound()
            assert channel.outbound is not None
            await channel.outbound.catalog.wait_for(
                lambda s: all(not e.tls for e in s.endpoints_of("echo")) and bool(s.endpoints_of("echo")),
                timeout=5,
            )
            assert (
                await echo_pb2_grpc.EchoStub(channel).Unary(REQUEST, timeout=5)
            ).payload == REQUEST.payload
            assert channel.pool is not None and channel.pool.describe()["mtls"] == 0
        assert counts[("plaintext", "allowed", "")] == 4
    finally:
        await side.stop(0)


async def test_the_caller_verifies_the_server_it_meant(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, ca: RunningCa
) -> None:
    """An endpoint of `echo` presenting a valid mesh certificate of `payments` is refused."""
    payments = await WorkloadIdentity.start(store, mesh_keys, "payments", token=ca.local_token)
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("impostor"), server)
    port = server.add_secure_port("127.0.0.1:0", gmesh.server_credentials(payments))
    await server.start()
    address = f"127.0.0.1:{port}"
    try:
        async with (
            gmesh.register(
                address, service="echo", store=store, prefix=mesh_keys.prefix, tls=True, reflection=False,
                grpc_services=["gmesh.v1.Echo"], handle_sigterm=False, drain_delay=0,
            ),
            gmesh.aio.channel(
                "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity="web",
                token=ca.local_token,
            ) as channel,
        ):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await echo_pb2_grpc.EchoStub(channel).Unary(REQUEST, timeout=3)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
        await payments.close()


async def test_python_server_enforces_policies_in_process(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, ca: RunningCa
) -> None:
    await put(
        store, mesh_keys, "AuthorizationPolicy", "no-bidi",
        {"service": "echo", "action": "DENY", "rules": [{"methods": ["/gmesh.v1.Echo/Bidi"]}]},
    )  # fmt: skip
    await put(
        store, mesh_keys, "AuthorizationPolicy", "watch-web",
        {"service": "echo", "action": "AUDIT", "rules": [{"from": [{"prefix": f"spiffe://{TD}/svc/w"}]}]},
    )  # fmt: skip
    async with gmesh.workload_identity(
        "echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, token=ca.local_token
    ) as identity:
        interceptors = gmesh.server_interceptors(
            "echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity=identity
        )
        server = grpc.aio.server(interceptors=interceptors)
        servicer = EchoServicer("py")
        echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", gmesh.server_credentials(identity))
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            async with (
                gmesh.register(
                    address, service="echo", store=store, prefix=mesh_keys.prefix, tls=True,
                    identity=identity, reflection=False, grpc_services=["gmesh.v1.Echo"],
                    handle_sigterm=False, drain_delay=0,
                ),
                gmesh.aio.channel(
                    "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity="web",
                    token=ca.local_token,
                ) as channel,
            ):  # fmt: skip
                stub = echo_pb2_grpc.EchoStub(channel)
                answer = await stub.Unary(echo_pb2.EchoRequest(message="hi"), timeout=5)
                assert answer.server == "py"
                replies = [r async for r in stub.ServerStream(echo_pb2.EchoRequest(count=3), timeout=5)]
                assert len(replies) == 3

                async def one() -> AsyncIterator[Any]:
                    yield echo_pb2.EchoRequest(message="x")

                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    async for _ in stub.Bidi(one(), timeout=5):
                        pass
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "DENY policy no-bidi" in (denied.value.details() or "")
            gate = interceptors[0].gate  # type: ignore[attr-defined]
            assert gate is not None
            assert gate.counts[("mtls", "audited", "watch-web")] == 3
            assert gate.counts[("mtls", "denied", "no-bidi")] == 1
            assert servicer.calls.get("Bidi", 0) == 0
        finally:
            await server.stop(None)
            await interceptors[0].close()  # type: ignore[attr-defined]


async def test_rotation_under_load_fails_no_call(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, tmp_path: Path, bare_app: str
) -> None:
    """10 s leaves, 60 s of calls through a channel and an outbound proxy to an inbound proxy:
    every process renews about 8 times, connections are rebuilt each time, no call fails."""
    async with running_ca(store, mesh_keys, trust_domain=TD, lifetime=10) as ca:
        await put(store, mesh_keys, "Service", "echo", {"tls": {"mode": "STRICT"}})
        side = await sidecar(etcd_server, mesh_keys, tmp_path, ca, bare_app, plain=False)
        outbound = await start_proxy(
            etcd_server, mesh_keys, tmp_path, identity="web", token=ca.local_token,
            snapshot_file=tmp_path / "outbound-snapshot.json",
        )  # fmt: skip
        results = {"channel": [0, 0], "proxy": [0, 0]}
        errors: list[str] = []
        stop = time.monotonic() + 60

        async def drive(name: str, stub: Any, metadata: Any) -> None:
            while time.monotonic() < stop:
                try:
                    await stub.Unary(REQUEST, metadata=metadata, timeout=5)
                    results[name][0] += 1
                except grpc.aio.AioRpcError as exc:
                    results[name][1] += 1
                    errors.append(f"{name}: {exc.code().name} {exc.details()}")

        try:
            async with (
                gmesh.aio.channel(
                    "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity="client",
                    token=ca.local_token,
                ) as channel,
                grpc.aio.insecure_channel(outbound.address) as to_proxy,
            ):  # fmt: skip
                await asyncio.gather(
                    drive("channel", echo_pb2_grpc.EchoStub(channel), ()),
                    drive("proxy", echo_pb2_grpc.EchoStub(to_proxy), (("x-gmesh-service", "echo"),)),
                )
                assert channel.identity is not None
                channel_renewals = channel.identity.renewals
                channel_rebuilds = channel.pool.rebuilds if channel.pool else 0
            assert side.identity is not None and outbound.identity is not None
            print(
                f"\nrotation under load: {results}; renewals: sidecar {side.identity.renewals}, "
                f"proxy {outbound.identity.renewals}, channel {channel_renewals} "
                f"(channel pool rebuilt {channel_rebuilds} times)"
            )
            assert errors == []
            assert results["channel"][0] > 100 and results["proxy"][0] > 100
            # 60 s of 10 s leaves renewed at ~2/3: about 8 renewals each; at least 5 on a busy box
            for renewals in (side.identity.renewals, outbound.identity.renewals, channel_renewals):
                assert renewals >= 5
            assert channel_rebuilds >= 5
        finally:
            await outbound.stop(0)
            await side.stop(0)


async def test_an_identity_keeps_serving_while_the_ca_is_away(
    store: Store, mesh_keys: MeshKeys, tmp_path: Path
) -> None:
    async with running_ca(store, mesh_keys, trust_domain=TD, lifetime=4) as ca:
        identity = await WorkloadIdentity.start(store, mesh_keys, "orders", token=ca.local_token)
        first = identity.material
        await ca.server.stop(None)  # the CA goes away
    try:
        await until(lambda: identity.failures >= 1, 10, "a failed renewal")
        assert identity.material is first  # still the certificate it had
        state = identity.describe()
        assert "CA unreachable" in state["state"] and state["lastError"]
        await until(lambda: "EXPIRED" in identity.describe()["state"], 10, "the certificate expired")
        # the CA comes back (same root, same local token): the identity gets a certificate again
        async with running_ca(store, mesh_keys, root=ca.root, local_token=ca.local_token, lifetime=60):
            await until(lambda: identity.stale_since is None, 40, "a certificate again")
            assert identity.material.not_after > time.time() + 30
            assert identity.describe()["state"] == "fresh"
    finally:
        await identity.close()


async def test_root_rotation_under_load_fails_no_call_and_early_removal_is_refused(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, tmp_path: Path, bare_app: str
) -> None:
    from gmesh.errors import Conflict
    from gmesh.security import rotation
    from gmesh.security.identity import root_id

    async with running_ca(store, mesh_keys, trust_domain=TD, lifetime=5) as ca:
        await put(store, mesh_keys, "Service", "echo", {"tls": {"mode": "STRICT"}})
        side = await sidecar(etcd_server, mesh_keys, tmp_path, ca, bare_app, plain=False)
        ok, errors = [0], []
        done = asyncio.Event()
        try:
            async with gmesh.aio.channel(
                "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity="client",
                token=ca.local_token,
            ) as channel:  # fmt: skip
                stub = echo_pb2_grpc.EchoStub(channel)

                async def drive() -> None:
                    while not done.is_set():
                        try:
                            await stub.Unary(REQUEST, timeout=5)
                            ok[0] += 1
                        except grpc.aio.AioRpcError as exc:
                            errors.append(f"{exc.code().name} {exc.details()}")

                load = asyncio.get_running_loop().create_task(drive())
                await until(lambda: ok[0] > 50, 10, "calls before the rotation")
                old = ca.root
                new = await ca.rotate(propagation=2.0)
                # at once: the old root still signs live certificates, so it may not leave
                with pytest.raises(Conflict):
                    await rotation.finish(store, mesh_keys)
                await until(
                    lambda: channel.identity.material.issuer == root_id(new.cert), 20,
                    "the channel renewed under the new root",
                )  # fmt: skip
                with pytest.raises(Conflict) as early:
                    await rotation.finish(store, mesh_keys)
                assert "live certificate(s) are still signed by the old root" in str(early.value)
                # once every leaf of the old root has expired (5 s leaves; the clock skew allowed
                # is 0.5 s here instead of a minute) it leaves the bundle, unforced
                live = [i for i in await rotation.issued(store, mesh_keys) if i.issuer == root_id(old.cert)]
                assert live
                expired = max(i.not_after for i in live) + 0.5
                await until(lambda: time.time() > expired, 15, "the old root's last leaf expired")
                bundle = await rotation.finish(store, mesh_keys, skew=0.5)
                assert len(bundle.roots) == 1
                before = ok[0]
                await until(lambda: ok[0] > before + 200, 20, "calls after the old root left")
                done.set()
                await load
            print(f"\nroot rotation under load: {ok[0]} calls, {len(errors)} failed")
            assert errors == []
            assert side.identity is not None and side.identity.material.issuer == root_id(new.cert)
        finally:
            done.set()
            await side.stop(0)


async def test_with_mtls_the_admin_port_requires_an_identity_policy_allows(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, tmp_path: Path, ca: RunningCa
) -> None:
    from gmesh.v1 import admin_pb2, admin_pb2_grpc

    await put(
        store, mesh_keys, "AuthorizationPolicy", "web-admin",
        {"service": "web", "rules": [{"from": [f"spiffe://{TD}/svc/ops"], "methods": ["/gmesh.v1.Admin/*"]}]},
    )  # fmt: skip
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path, identity="web", token=ca.local_token)
    try:
        assert proxy.admin is not None and proxy.info()["adminTls"] is True
        address = proxy.admin.address

        async def dump(credentials: grpc.ChannelCredentials | None) -> Any:
            channel = (
                grpc.aio.secure_channel(address, credentials, [("grpc.ssl_target_name_override", "web")])
                if credentials is not None
                else grpc.aio.insecure_channel(address)
            )
            async with channel:
                stub = admin_pb2_grpc.AdminStub(channel)
                return await stub.ConfigDump(admin_pb2.ConfigDumpRequest(), timeout=5)

        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await dump(None)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as intruder:
            await dump(leaf_credentials(ca.root, "intruder"))
        assert intruder.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "web-admin" in (intruder.value.details() or "")
        shown = json.loads((await dump(leaf_credentials(ca.root, "ops"))).json)
        state = shown["proxy"]["identityState"]
        assert state["identity"] == WEB and state["state"] == "fresh" and state["expiresInSeconds"] > 3000
    finally:
        await proxy.stop(0)


async def test_route_rules_match_the_callers_identity(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, ca: RunningCa
) -> None:
    from gmesh.testing.echo import start_echo_server

    servers = {v: await start_echo_server(v) for v in ("v1", "v2")}
    await put(store, mesh_keys, "Service", "echo", {"subsets": {v: {"version": v} for v in servers}})
    await put(
        store, mesh_keys, "Route", "echo",
        {"service": "echo", "rules": [
            {"name": "web-to-v2", "match": {"caller": {"identity": {"exact": WEB}}},
             "backends": [{"subset": "v2", "weight": 100}]},
            {"name": "rest", "backends": [{"subset": "v1", "weight": 100}]},
        ]},
    )  # fmt: skip
    try:
        async with (
            gmesh.register(servers["v1"].address, service="echo", labels={"version": "v1"}, store=store,
                           prefix=mesh_keys.prefix, handle_sigterm=False, drain_delay=0),
            gmesh.register(servers["v2"].address, service="echo", labels={"version": "v2"}, store=store,
                           prefix=mesh_keys.prefix, handle_sigterm=False, drain_delay=0),
        ):  # fmt: skip
            for who, expected in (("web", "v2"), ("batch", "v1")):
                async with gmesh.aio.channel(
                    "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity=who,
                    token=ca.local_token,
                ) as channel:  # fmt: skip
                    stub = echo_pb2_grpc.EchoStub(channel)
                    answers = [(await stub.Unary(REQUEST, timeout=5)).server for _ in range(10)]
                    assert answers == [expected] * 10, who
    finally:
        for server in servers.values():
            await server.stop(None)


async def test_an_external_root_with_gmesh_as_its_intermediate(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys
) -> None:
    """An organisation's root signs gmesh's CA; workloads trust only that root, leaves carry the
    intermediate, and mTLS calls (and renewals by the current certificate) work."""
    from cryptography import x509

    organisation = Root.create(TD, path_length=1)
    intermediate = Root.create(TD, parent=organisation)
    bundle = (cert_pem(organisation.cert).decode(),)
    async with running_ca(store, mesh_keys, root=intermediate, bundle=bundle, lifetime=4) as ca:
        echo = await WorkloadIdentity.start(store, mesh_keys, "echo", token=ca.local_token)
        chain = x509.load_pem_x509_certificates(echo.material.cert_pem)
        assert [c.subject for c in chain] == [chain[0].subject, intermediate.cert.subject]
        assert echo.material.roots_pem == bundle[0].encode()
        server = grpc.aio.server()
        echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("org"), server)
        port = server.add_secure_port("127.0.0.1:0", gmesh.server_credentials(echo))
        await server.start()
        try:
            async with (
                gmesh.register(
                    f"127.0.0.1:{port}", service="echo", store=store, prefix=mesh_keys.prefix, tls=True,
                    reflection=False, grpc_services=["gmesh.v1.Echo"], handle_sigterm=False, drain_delay=0,
                ),
                gmesh.aio.channel(
                    "gmesh:///echo", etcd=etcd_server.url, prefix=mesh_keys.prefix, identity="web",
                    token=ca.local_token,
                ) as channel,
            ):  # fmt: skip
                stub = echo_pb2_grpc.EchoStub(channel)
                assert (await stub.Unary(REQUEST, timeout=5)).server == "org"
                await echo.wait_renewed(10)  # renewed by its current (intermediate-signed) certificate
                assert (await stub.Unary(REQUEST, timeout=5)).server == "org"
                assert echo.renewals >= 1 and echo.failures == 0
        finally:
            await server.stop(None)
            await echo.close()


async def test_the_inbound_proxy_enforces_rate_limits_per_verified_caller(
    etcd_server: EtcdMember, store: Store, mesh_keys: MeshKeys, tmp_path: Path, ca: RunningCa, bare_app: str
) -> None:
    from gmesh.v1 import admin_pb2, admin_pb2_grpc

    await put(
        store,
        mesh_keys,
        "RateLimit",
        "per-caller",
        {"service": "echo", "rate": "1/h", "burst": 2, "key": "caller"},
    )
    side = await sidecar(etcd_server, mesh_keys, tmp_path, ca, bare_app)
    try:
        assert side.sidecar is not None and side.admin is not None
        tls = side.sidecar.tls_address
        await wait_record(store, mesh_keys, lambda r: r.get("tls") == tls)
        web, batch = leaf_credentials(ca.root, "web"), leaf_credentials(ca.root, "batch")
        assert [(await unary(tls, web)).payload for _ in range(2)] == [REQUEST.payload] * 2
        over = await refused(tls, web)
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"for caller {WEB}" in (over.details() or "")
        assert (await unary(tls, batch)).payload == REQUEST.payload  # another identity, its own bucket
        admin = grpc.aio.secure_channel(side.admin.address, web, [("grpc.ssl_target_name_override", "echo")])
        async with admin as channel:  # with an identity, the admin port is mTLS only
            dump = await admin_pb2_grpc.AdminStub(channel).ConfigDump(
                admin_pb2.ConfigDumpRequest(service="echo"), timeout=5
            )
        limits = json.loads(dump.json)["services"]["echo"]["rateLimits"]
        assert [(limit["name"], limit["rejected"], limit["keys"]) for limit in limits] == [
            ("per-caller", 1, 2)
        ]
    finally:
        await side.stop(0)
