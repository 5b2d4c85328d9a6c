"""Join tokens and the trust bundle in etcd.

A join token authenticates a workload's first CSR: `gmesh ca token --service S --ttl 1h` prints a
random token and stores only its SHA-256 under an etcd lease of that TTL (expired tokens vanish
with their lease). The CA spends a token with one transaction that deletes its key only if it
is still there, so a token works once, even against two CAs racing. The trust bundle holds the
root certificates (never a key) every workload verifies peers with.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gmesh.errors import GmeshError, InvalidArgument
from gmesh.store.etcd import Compare, Delete

if TYPE_CHECKING:
    from gmesh.discovery.keys import MeshKeys
    from gmesh.store.etcd import Store


class TokenRefused(GmeshError):
    """A join token that is unknown, used already or expired."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(store: Store, keys: MeshKeys, service: str, ttl: float) -> str:
    """A new single-use token for `service`, valid `ttl` seconds (at least 1)."""
    if ttl < 1:
        raise InvalidArgument("a token lives at least 1s")
    token = secrets.token_urlsafe(32)
    lease = await store.grant_lease(int(ttl))
    record = {"service": service, "expires": time.time() + ttl}
    await store.put(keys.join_token(digest(token)), json.dumps(record).encode(), lease=lease)
    return token


@dataclass(frozen=True)
class HeldToken:
    """A token that exists and has not expired, not spent yet."""

    key: str
    mod_revision: int
    service: str


REFUSED = "unknown, used or expired join token"


async def check_token(store: Store, keys: MeshKeys, token: str) -> HeldToken:
    """What `token` allows, without spending it; `TokenRefused` when it allows nothing."""
    key = keys.join_token(digest(token))
    found = await store.get(key)
    if found is None:
        raise TokenRefused(REFUSED)
    try:
        record = json.loads(found.value)
        service, expires = str(record["service"]), float(record["expires"])
    except (ValueError, KeyError, TypeError):
        raise TokenRefused(REFUSED) from None
    if expires < time.time():
        raise TokenRefused(REFUSED)
    return HeldToken(key, found.mod_revision, service)


async def spend(store: Store, held: HeldToken) -> None:
    """Delete the token if nobody spent it since it was checked; `TokenRefused` if somebody did."""
    result = await store.txn([Compare(held.key, "mod", held.mod_revision)], [Delete(held.key)])
    if not result.succeeded:
        raise TokenRefused(REFUSED)


async def spend_token(store: Store, keys: MeshKeys, token: str) -> str:
    """The service `token` was made for; the token is gone afterwards."""
    held = await check_token(store, keys, token)
    await spend(store, held)
    return held.service


@dataclass(frozen=True)
class TrustBundle:
    """The roots peers are verified with (certificates only). During a root rotation it holds the
    new root first and the previous one second: the CA signs with the previous one until
    `signs_from` (so every process trusts the new root before any leaf of it exists), and the
    previous one may leave only after `removable_after` (every leaf it signed has expired)."""

    trust_domain: str
    roots: tuple[str, ...]  # PEM certificates
    signs_from: float = 0.0
    removable_after: float = 0.0

    def pem(self) -> bytes:
        return "".join(self.roots).encode()

    @property
    def rotating(self) -> bool:
        return len(self.roots) > 1


async def write_bundle(store: Store, keys: MeshKeys, bundle: TrustBundle) -> None:
    doc: dict[str, object] = {"trustDomain": bundle.trust_domain, "roots": list(bundle.roots)}
    if bundle.rotating:
        doc["signsFrom"], doc["removableAfter"] = bundle.signs_from, bundle.removable_after
    await store.put(keys.trust_bundle, json.dumps(doc).encode())


def parse_bundle(raw: bytes) -> TrustBundle:
    doc = json.loads(raw)
    return TrustBundle(
        str(doc["trustDomain"]),
        tuple(str(r) for r in doc["roots"]),
        float(doc.get("signsFrom") or 0.0),
        float(doc.get("removableAfter") or 0.0),
    )


async def read_bundle(store: Store, keys: MeshKeys) -> TrustBundle | None:
    found = await store.get(keys.trust_bundle)
    if found is None:
        return None
    return parse_bundle(found.value)
