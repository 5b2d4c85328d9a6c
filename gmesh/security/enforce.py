"""Where a call is received: its caller's verified identity, the service's TLS mode, and the
authorization decision. One `Gate` per received service, shared by the inbound proxy
(`gmesh proxy --inbound`) and Python servers (`gmesh.server_interceptors()`).

The caller's identity is the SPIFFE ID grpc verified in the handshake (`peer_spiffe_id` of the
auth context, from the client certificate's URI SAN, chained to the trust bundle); a plaintext
call has none. STRICT refuses plaintext calls with UNAUTHENTICATED; PERMISSIVE takes both and
counts which; policies then decide (`gmesh.security.authz`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.errors import CallError
from gmesh.security.authz import KIND, SELF_PROBES, Authorizers

if TYPE_CHECKING:
    from gmesh.chain.metadata import Metadata
    from gmesh.discovery.catalog import MeshSnapshot

log = logging.getLogger(__name__)

MTLS, PLAINTEXT = "mtls", "plaintext"


def mode_of(snapshot: MeshSnapshot, service: str) -> str:
    resource = snapshot.resource("Service", service)
    if resource is None:
        return "PERMISSIVE"
    return str(resource.spec.tls.mode)  # type: ignore[attr-defined]


def peer_of(context: Any) -> tuple[str, bool]:
    """(the caller's SPIFFE ID or '', whether the call came over TLS) from a server context."""
    auth: Mapping[str, list[bytes]] = context.auth_context()
    spiffe = auth.get("peer_spiffe_id")
    if spiffe:
        return spiffe[0].decode(), True
    security = auth.get("transport_security_type")
    return "", security is not None and b"ssl" in security


class Gate:
    """Admits calls to `service` by the current snapshot's TLS mode and policies."""

    def __init__(self, service: str, snapshot: Callable[[], MeshSnapshot], *, own_identity: str = "") -> None:
        self.service = service
        self._snapshot = snapshot
        self._authorizers = Authorizers()
        #: this server's own identity: its probes of itself (health, reflection) always pass
        self.own_identity = own_identity
        #: (transport, result, policy) -> calls; result is allowed, denied, audited, refused
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        from gmesh.stats.metrics import COLLECTOR

        COLLECTOR.add_source(self)  # gmesh_received_calls_total (weakly held)

    def admit(self, context: Any, method: str, metadata: Metadata) -> str:
        """The caller's identity, or `CallError` (UNAUTHENTICATED, PERMISSION_DENIED)."""
        identity, tls = peer_of(context)
        transport = MTLS if tls else PLAINTEXT
        snapshot = self._snapshot()
        if not tls and mode_of(snapshot, self.service) == "STRICT":
            self.counts[(transport, "refused", "")] += 1
            raise CallError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"gmesh: {self.service} accepts only mutual TLS (tls.mode STRICT); this call was plaintext",
            )
        authorizer = self._authorizers.for_service(snapshot.resources.get(KIND), self.service)
        if authorizer.empty or (
            identity and identity == self.own_identity and method.startswith(SELF_PROBES)
        ):
            self.counts[(transport, "allowed", "")] += 1
            return identity
        decision = authorizer.decide(identity, method, metadata)
        for name in decision.audits:
            self.counts[(transport, "audited", name)] += 1
            log.info(
                "AUDIT %s: %s calls %s of %s (%s)",
                name, identity or "plaintext caller", method, self.service,
                "allowed" if decision.allowed else "denied",
            )  # fmt: skip
        if not decision.allowed:
            self.counts[(transport, "denied", decision.policy)] += 1
            raise CallError(grpc.StatusCode.PERMISSION_DENIED, authorizer.denial(decision, identity, method))
        self.counts[(transport, "allowed", decision.policy)] += 1
        return identity

    def metric_samples(self, out: Any) -> None:
        for (transport, result, policy), count in list(self.counts.items()):
            out.counter("received_calls", (self.service, transport, result, policy), count)

    def describe(self) -> dict[str, Any]:
        snapshot = self._snapshot()
        return {
            "service": self.service,
            "tlsMode": mode_of(snapshot, self.service),
            "calls": [
                {"transport": t, "result": r, "policy": p, "count": n}
                for (t, r, p), n in sorted(self.counts.items())
            ],
        }
