"""Rotating the mesh's root (`gmesh ca rotate`) and what the CA has issued (`gmesh ca status`).

A rotation has two steps, and the order is what keeps traffic flowing:

1. `begin`: the new root joins the trust bundle (first) next to the old one. Every process
   watches the bundle and trusts both within moments; the CA keeps signing with the old root
   for `propagation` seconds more, so no leaf of the new root exists before everyone trusts it.
   Then the CA signs with the new root, and workloads move to it as they renew (2/3 of a
   leaf's lifetime).
2. `finish`: the old root leaves the bundle. Refused while any certificate it signed is still
   valid (the CA records every leaf it signs in etcd until it expires), with their count and
   when the last expires: removing it earlier makes peers refuse those certificates — the
   mistake that cost Linkerd users minutes of traffic.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from gmesh.errors import Conflict, NotFound
from gmesh.security.ca import CLOCK_SKEW, Root, cert_pem
from gmesh.security.identity import root_id
from gmesh.security.tokens import TrustBundle, read_bundle, write_bundle

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store

DEFAULT_PROPAGATION = 10.0


@dataclass(frozen=True)
class Issued:
    serial: str
    service: str
    identity: str
    issuer: str
    not_after: float


async def issued(store: Store, keys: MeshKeys, *, grace: float = 0.0) -> list[Issued]:
    """Every certificate the CA signed that has not expired yet (or did less than `grace` ago)."""
    kvs, _ = await store.get_prefix(keys.issued_root)
    now = time.time() - grace
    found = []
    for kv in kvs:
        try:
            doc = json.loads(kv.value)
            item = Issued(
                kv.key.rsplit("/", 1)[1],
                str(doc["service"]),
                str(doc.get("identity") or ""),
                str(doc["issuer"]),
                float(doc["notAfter"]),
            )
        except (ValueError, KeyError, TypeError):
            continue
        if item.not_after > now:
            found.append(item)
    return found


def roots_of(bundle: TrustBundle) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(r.encode()) for r in bundle.roots]


async def begin(
    store: Store, keys: MeshKeys, new: Root, *, propagation: float = DEFAULT_PROPAGATION
) -> TrustBundle:
    """Put `new` first in the bundle, the current root after it; the CA switches at +propagation."""
    bundle = await read_bundle(store, keys)
    if bundle is None:
        raise NotFound("this mesh has no CA: run `gmesh ca init`")
    if bundle.rotating:
        raise Conflict(
            "a root rotation is in progress: finish it first (`gmesh ca rotate --finish`, allowed once "
            "no certificate of the old root is still valid)"
        )
    if new.trust_domain != bundle.trust_domain:
        raise Conflict(
            f"the new root is for {new.trust_domain}, the mesh's trust domain is {bundle.trust_domain}"
        )
    rotated = TrustBundle(
        bundle.trust_domain,
        (cert_pem(new.cert).decode(), *bundle.roots),
        signs_from=time.time() + propagation,
    )
    await write_bundle(store, keys, rotated)
    return rotated


@dataclass(frozen=True)
class Blocked:
    live: int
    last_expiry: float


async def finish(
    store: Store, keys: MeshKeys, *, force: bool = False, skew: float = CLOCK_SKEW.total_seconds()
) -> TrustBundle:
    """Drop the old root(s) from the bundle: refused (`Conflict`, with the count) while any leaf
    they signed is valid (or was, less than `skew` ago: clocks differ), or before the new root
    signs, unless `force`."""
    bundle = await read_bundle(store, keys)
    if bundle is None:
        raise NotFound("this mesh has no CA: run `gmesh ca init`")
    if not bundle.rotating:
        raise Conflict("no root rotation is in progress (start one with `gmesh ca rotate`)")
    roots = roots_of(bundle)
    old = {root_id(r) for r in roots[1:]}
    now = time.time()
    if not force:
        if now < bundle.signs_from:
            raise Conflict(
                f"the CA still signs with the old root for {bundle.signs_from - now:.0f}s "
                "(every process must trust the new one first)"
            )
        live = [i for i in await issued(store, keys, grace=skew) if i.issuer in old]
        if live:
            last = max(i.not_after for i in live) + skew
            raise Conflict(
                f"refused: {len(live)} live certificate(s) are still signed by the old root "
                f"({', '.join(sorted({i.service for i in live})[:5])}); peers would refuse them at once. "
                f"The last expires in {last - now:.0f}s (incl. clock skew): finish after that "
                "(or --force, and break them)"
            )
    finished = TrustBundle(bundle.trust_domain, bundle.roots[:1])
    await write_bundle(store, keys, finished)
    return finished
