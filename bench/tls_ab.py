"""mTLS A/B in one process: bare grpc.aio (plaintext, mTLS) vs gmesh.aio.channel (plaintext, mTLS
with identity=) against one Echo server serving both, interleaved; CPU µs per call of the whole process
(client and server share it, so differences are the clients'), and calls/s.

    python bench/tls_ab.py [CONCURRENCY] [--reps N]

Starts its own etcd, an in-process mesh CA, and stops everything it started.
"""

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection

import gmesh
import gmesh.aio
from gmesh.discovery.keys import MeshKeys
from gmesh.security.identity import WorkloadIdentity
from gmesh.store.etcd import EtcdConfig, Store
from gmesh.testing.echo import EchoServicer
from gmesh.testing.etcd import single_member
from gmesh.testing.mtls import running_ca
from gmesh.v1 import echo_pb2, echo_pb2_grpc

CONC = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 32
REPS = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 3


async def run(ch, n, conc, md=None):
    stub = echo_pb2_grpc.EchoStub(ch)
    req = echo_pb2.EchoRequest(payload=b"x" * 100)
    for _ in range(200):
        await stub.Unary(req)

    async def w():
        for _ in range(n // conc):
            await stub.Unary(req)

    t = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(w() for _ in range(conc)))
    return round((time.process_time() - t) / n * 1e6), round(n / (time.perf_counter() - t0))


async def main():
    d = Path(tempfile.mkdtemp())
    m = single_member(d)
    m.start()
    store = await Store.connect(EtcdConfig.parse(m.url))
    keys = MeshKeys("/p/")
    try:
        async with running_ca(store, keys) as ca:
            ident = await WorkloadIdentity.start(store, keys, "echo", token=ca.local_token)
            server = grpc.aio.server()
            echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("s"), server)
            reflection.enable_server_reflection(("gmesh.v1.Echo", reflection.SERVICE_NAME), server)
            port = server.add_secure_port("127.0.0.1:0", ident.server_credentials())
            pport = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            addr = f"127.0.0.1:{port}"
            client = await WorkloadIdentity.start(store, keys, "client", token=ca.local_token)
            async with gmesh.register(
                addr,
                service="echo",
                store=store,
                prefix=keys.prefix,
                tls_address=addr,
                identity=ident,
                handle_sigterm=False,
                drain_delay=0,
            ) as reg:
                print("methods known:", len(reg.endpoint.methods))
                async with gmesh.register(
                    f"127.0.0.1:{pport}",
                    service="echop",
                    store=store,
                    prefix=keys.prefix,
                    handle_sigterm=False,
                    drain_delay=0,
                ):
                    for _rep in range(REPS):
                        async with grpc.aio.secure_channel(
                            addr, client.channel_credentials(), [("grpc.ssl_target_name_override", "echo")]
                        ) as ch:
                            print("direct-tls", await run(ch, 6000, CONC))
                        async with grpc.aio.insecure_channel(f"127.0.0.1:{pport}") as ch:
                            print("direct-plain", await run(ch, 6000, CONC))
                        async with gmesh.aio.channel(
                            "gmesh:///echo",
                            etcd=m.url,
                            prefix=keys.prefix,
                            identity="client",
                            token=ca.local_token,
                        ) as ch:
                            print("channel-tls", await run(ch, 6000, CONC))
                        async with gmesh.aio.channel("gmesh:///echop", etcd=m.url, prefix=keys.prefix) as ch:
                            print("channel-plain", await run(ch, 6000, CONC))
            await server.stop(None)
    finally:
        await store.close()
        m.stop()


asyncio.run(main())
