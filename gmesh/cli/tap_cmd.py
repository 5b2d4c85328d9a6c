"""`gmesh tap`: live calls to a service as they end, from every proxy (or the admin ports named),
with message bodies decoded here, in the CLI, through the upstream's server reflection."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
import grpc
import grpc.aio

from gmesh.cli.common import MeshTarget, mesh_options, run
from gmesh.errors import InvalidArgument, NotFound
from gmesh.stats.tap import DEFAULT_BODY, DEFAULT_RATE, MAX_BODY, MAX_RATE
from gmesh.store.etcd import Store
from gmesh.v1 import admin_pb2, admin_pb2_grpc


class BodyDecoder:
    """Message bodies of a service's methods as JSON, from its endpoints' server reflection
    (looked up once per gRPC service; bodies that do not decode are shown as hex)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self._types: dict[str, tuple[Any, Any] | None] = {}

    async def types(self, method: str) -> tuple[Any, Any] | None:
        if method not in self._types:
            self._types[method] = await self._lookup(method)
        return self._types[method]

    async def _lookup(self, method: str) -> tuple[Any, Any] | None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        from gmesh.discovery.probe import file_descriptors

        service, _, name = method[1:].partition("/")
        for address in self.addresses:
            try:
                raw = await file_descriptors(address, service)
            except (grpc.aio.AioRpcError, TimeoutError):
                continue
            pool = descriptor_pool.DescriptorPool()
            pending = [descriptor_pb2.FileDescriptorProto.FromString(r) for r in raw]
            while pending:  # dependencies first, whatever order reflection sent them in
                left = []
                for fd in pending:
                    try:
                        pool.Add(fd)
                    except TypeError:
                        left.append(fd)
                if len(left) == len(pending):
                    break
                pending = left
            try:
                found = pool.FindMethodByName(f"{service}.{name}")
            except KeyError:
                continue
            return (
                message_factory.GetMessageClass(found.input_type),
                message_factory.GetMessageClass(found.output_type),
            )
        return None

    async def decode(self, method: str, body: bytes, response: bool, truncated: bool) -> Any:
        from google.protobuf import json_format
        from google.protobuf.message import DecodeError

        types = await self.types(method)
        if types is None or truncated:
            return {"hex": body.hex(), **({"truncated": True} if truncated else {})}
        try:
            message = types[1 if response else 0].FromString(body)
        except DecodeError:
            return {"hex": body.hex()}
        return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def _admins(store: Store, target: MeshTarget) -> dict[str, str]:
    """Admin address of every running proxy -> the service name its mTLS admin port presents
    ('' for a plaintext admin port)."""
    kvs, _ = await store.get_prefix(target.keys.proxies_root)
    found: dict[str, str] = {}
    for kv in kvs:
        try:
            record = json.loads(kv.value)
        except ValueError:
            continue
        admin = record.get("admin")
        if admin:
            identity = str(record.get("identity") or "") if record.get("adminTls") else ""
            found[str(admin)] = identity.rpartition("/svc/")[2] if identity else ""
    return dict(sorted(found.items()))


async def _endpoints(store: Store, target: MeshTarget, service: str) -> list[str]:
    kvs, _ = await store.get_prefix(target.keys.endpoints_of(service))
    found = []
    for kv in kvs:
        try:
            found.append(str(json.loads(kv.value)["address"]))
        except (ValueError, KeyError):
            continue
    return found


def _line(event: Any, source: str) -> str:
    where = f" -> {event.endpoint}" if event.endpoint else ""
    via = ", ".join(x for x in (event.backend, event.route) if x)
    headers = " ".join(f"{h.key}={h.value}" for h in event.metadata)
    dropped = f" (+{event.dropped} skipped)" if event.dropped else ""
    return (
        f"{event.time[11:23]} {event.door} {event.method} {event.code} {event.duration_ms:.1f}ms{where}"
        f"{f' ({via})' if via else ''} attempts={event.attempts} from={source}{dropped}"
        f"{f'  {headers}' if headers else ''}"
    )


@click.command()
@click.argument("service")
@click.option(
    "--method", default="", help="only this method (/pkg.Service/Method), or a prefix ending in '/'"
)
@click.option("--bodies", is_flag=True, help="show request and response messages of unary calls, decoded")
@click.option(
    "--rate",
    type=click.IntRange(1, MAX_RATE),
    default=DEFAULT_RATE,
    show_default=True,
    help="events per second at most, per process tapped (calls beyond are skipped and counted)",
)
@click.option(
    "--max-body",
    type=click.IntRange(1, MAX_BODY),
    default=DEFAULT_BODY,
    show_default=True,
    help="bytes of each body at most (longer ones are cut and shown as hex)",
)
@click.option(
    "--admin",
    "admins",
    multiple=True,
    metavar="HOST:PORT",
    help="tap this admin port (repeatable; an application's gmesh.admin too) [default: every proxy]",
)
@click.option("-n", "--count", type=click.IntRange(min=1), default=None, help="stop after this many calls")
@click.option(
    "--identity",
    default=None,
    metavar="SERVICE",
    help="the mesh identity to present to admin ports that serve mTLS (proxies with --identity; "
    "their AuthorizationPolicies must allow it /gmesh.v1.Admin/*)",
)
@click.option("--token", envvar="GMESH_JOIN_TOKEN", default=None, help="join token for --identity")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="a line per call, or one JSON object per call",
)
@mesh_options
def tap(
    target: MeshTarget,
    service: str,
    method: str,
    bodies: bool,
    rate: int,
    max_body: int,
    admins: tuple[str, ...],
    count: int | None,
    output: str,
    identity: str | None,
    token: str | None,
) -> None:
    """Watch calls to SERVICE live, as they end: method, metadata, code, latency, endpoint.

    Taps every running `gmesh proxy` of the mesh (their admin ports, from etcd) or the
    --admin ports given. Each process enforces the tap's bounds itself (a rate cap, bodies
    cut to --max-body, a few taps at a time) and redacts metadata and bodies with its
    plugins before anything leaves it. With --bodies, messages are decoded here through
    the service's server reflection; the proxy never decodes them. Ctrl-C stops.
    """
    request = admin_pb2.TapRequest(
        service=service, method=method, bodies=bodies, max_rate=rate, max_body_bytes=max_body
    )

    async def go() -> None:
        from gmesh.security.identity import WorkloadIdentity

        me: WorkloadIdentity | None = None
        async with target.store() as store:
            running = await _admins(store, target)
            found = {a: running.get(a, "") for a in admins} if admins else running
            decoder = BodyDecoder(await _endpoints(store, target, service)) if bodies else None
            if identity and any(found.values()):
                me = await WorkloadIdentity.start(store, target.keys, identity, token=token)
                await me.close()  # one certificate is enough for a tap
        if not found:
            raise NotFound("no running proxy to tap (start one, or name an admin port with --admin)")
        missing = [a for a, name in found.items() if name and me is None]
        if missing:
            raise InvalidArgument(
                f"admin port {missing[0]} serves mutual TLS: tap it with --identity SERVICE (an identity "
                "its AuthorizationPolicies allow)"
            )

        def channel_to(address: str) -> grpc.aio.Channel:
            name = found[address]
            if not name or me is None:
                return grpc.aio.insecure_channel(address)
            return grpc.aio.secure_channel(
                address, me.channel_credentials(), [("grpc.ssl_target_name_override", name)]
            )

        events: asyncio.Queue[tuple[str, Any] | BaseException] = asyncio.Queue(1000)

        settled = {address: asyncio.Event() for address in found}  # its tap is open, or refused

        async def follow(address: str) -> None:
            try:
                async with channel_to(address) as channel:
                    call = admin_pb2_grpc.AdminStub(channel).Tap(request)
                    await call.initial_metadata()  # the process opened the tap (or the call failed)
                    settled[address].set()
                    async for event in call:
                        await events.put((address, event))
            except grpc.aio.AioRpcError as exc:
                await events.put(RuntimeError(f"{address}: {exc.code().name}: {exc.details()}"))
            finally:
                settled[address].set()

        tasks = [asyncio.create_task(follow(a)) for a in found]
        # say so once every tap is open: calls from then on are seen (scripts can wait for this line)
        await asyncio.gather(*(e.wait() for e in settled.values()))
        click.echo(f"tapping {service} on {', '.join(found)} (Ctrl-C stops)", err=True)
        shown = 0
        try:
            while count is None or shown < count:
                item = await events.get()
                if isinstance(item, BaseException):
                    click.echo(f"warning: {item}", err=True)
                    if all(t.done() for t in tasks) and events.empty():
                        return
                    continue
                source, event = item
                shown += 1
                await _show(event, source, output, decoder)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        run(go())
    except KeyboardInterrupt:
        sys.exit(0)


async def _show(event: Any, source: str, output: str, decoder: BodyDecoder | None) -> None:
    request = response = None
    if decoder is not None and (event.request or event.response):
        request = await decoder.decode(event.method, event.request, False, event.request_truncated)
        if event.code == "OK":  # a failed call has no response message
            response = await decoder.decode(event.method, event.response, True, event.response_truncated)
    if output == "json":
        from google.protobuf import json_format

        doc = json_format.MessageToDict(event, preserving_proto_field_name=True)
        doc.pop("request", None)
        doc.pop("response", None)
        doc["source"] = source
        if decoder is not None:
            doc["request"], doc["response"] = request, response
        click.echo(json.dumps(doc, separators=(",", ":")))
        return
    click.echo(_line(event, source))
    if request is not None:
        click.echo(f"  > {json.dumps(request, separators=(',', ':'))}")
    if response is not None:
        click.echo(f"  < {json.dumps(response, separators=(',', ':'))}")
