"""The `AuthorizationPolicy` kind and its compiled form: who may call what, decided where a call
is received (the inbound proxy, `gmesh.server_interceptors()`), on verified identities.

kind: AuthorizationPolicy
metadata: {name: orders-readers}
spec:
  service: orders
  action: ALLOW                      # ALLOW | DENY | AUDIT
  rules:
    - from: ["spiffe://gmesh.local/svc/web", {prefix: "spiffe://gmesh.local/svc/team-"}]
      methods: ["/orders.v1.Orders/Get*"]
      metadata: {x-tenant: {exact: acme}}

A rule holds when each of its fields holds (a field not given holds for every call); a policy
matches a call when one of its rules holds. For one service:

1. a matching DENY policy denies (DENY wins over everything);
2. a matching AUDIT policy is logged and counted, never enforced;
3. once any ALLOW policy selects the service, a call no ALLOW policy matches is denied;
   with no ALLOW policy, what no DENY policy denies is allowed.

`from` entries: a string is an exact SPIFFE ID, or a glob when it has `*` (`*` alone also
matches callers with no identity: plaintext in PERMISSIVE); `{exact: ...}`, `{prefix: ...}`,
`{glob: ...}` say so explicitly. `methods`: exact paths, or prefixes ending in `*`.
Denied calls get PERMISSION_DENIED naming the policy. Compiled once per config change: a
decision is a few set lookups and string compares, no allocation.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gmesh.chain.metadata import Metadata, metadata_values
from gmesh.config.kinds import ConfigView, Kind, Resource
from gmesh.config.types import MetadataKey, MethodPattern, Name, SpecModel
from gmesh.routing import match as m
from gmesh.routing.spec import MetadataMatch

KIND = "AuthorizationPolicy"
#: A server may always ask itself these (its own registration probes them over mTLS).
SELF_PROBES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
               "/grpc.reflection.v1.ServerReflection/")  # fmt: skip


class IdentityMatch(SpecModel):
    """Exactly one of `exact`, `prefix`, `glob` (`*` matches any run of characters)."""

    exact: str | None = None
    prefix: str | None = None
    glob: str | None = None

    @model_validator(mode="after")
    def _one(self) -> IdentityMatch:
        given = [k for k in ("exact", "prefix", "glob") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of exact, prefix, glob (got {', '.join(given) or 'none'})")
        return self


def _strings_too(schema: dict[str, Any]) -> None:
    """Editors see what the loader takes: a `from` entry is a string or an IdentityMatch."""
    for option in schema.get("anyOf", ()):
        if option.get("type") == "array":
            option["items"] = {"anyOf": [{"type": "string"}, option["items"]]}


class RuleSpec(SpecModel):
    """One rule: the caller (`from`), the method and the request metadata; each given must hold."""

    from_: list[IdentityMatch] | None = Field(
        default=None,
        alias="from",
        min_length=1,
        description="Caller identities (SPIFFE IDs): exact strings, globs with '*', or "
        "{exact|prefix|glob: ...}. '*' also matches callers without an identity (plaintext).",
        json_schema_extra=lambda schema: _strings_too(schema),
    )
    methods: list[MethodPattern] | None = Field(
        default=None,
        min_length=1,
        description="Method paths (/pkg.Service/Method), or prefixes ending in '*'.",
    )
    metadata: dict[MetadataKey, MetadataMatch] | None = Field(
        default=None, description="Request metadata key -> match (exact, prefix, regex, present, absent)."
    )

    @field_validator("from_", mode="before")
    @classmethod
    def _from(cls, sources: Any) -> Any:
        """A string is an exact SPIFFE ID, or a glob when it has '*': one entry type after this."""
        if not isinstance(sources, list):
            return sources
        out = []
        for source in sources:
            if isinstance(source, str):
                if source != "*" and not source.startswith("spiffe://") and "*" not in source:
                    raise ValueError(
                        f"from {source!r}: a SPIFFE ID (spiffe://<trust-domain>/svc/<service>) or a glob"
                    )
                source = {"glob": source} if "*" in source else {"exact": source}
            out.append(source)
        return out


class AuthorizationPolicySpec(SpecModel):
    """Who may call a service: rules and what to do when one matches."""

    service: Name = Field(description="The mesh service whose received calls this policy decides.")
    action: Literal["ALLOW", "DENY", "AUDIT"] = Field(
        default="ALLOW", description="ALLOW, DENY (wins over ALLOW), or AUDIT (log and count only)."
    )
    rules: list[RuleSpec] = Field(
        description="The policy matches a call when one rule holds; a rule `{}` holds for every call.",
        min_length=1,
    )


# --------------------------------------------------------------------------- compiled


_NEVER: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Rule:
    """A rule, compiled: None = the field holds for every call."""

    ids: frozenset[str] | None
    id_prefixes: tuple[str, ...]
    id_pattern: re.Pattern[str] | None
    methods: frozenset[str] | None
    method_prefixes: tuple[str, ...]
    metadata: tuple[tuple[str, m.StringPredicate], ...]

    def holds(self, identity: str, method: str, metadata: Metadata, *, deny: bool = False) -> bool:
        if self.ids is not None and not (
            identity in self.ids
            or (self.id_prefixes and identity.startswith(self.id_prefixes))
            or (self.id_pattern is not None and self.id_pattern.fullmatch(identity) is not None)
        ):
            return False
        if self.methods is not None and not (
            method in self.methods or (self.method_prefixes and method.startswith(self.method_prefixes))
        ):
            return False
        for key, predicate in self.metadata:
            values = [
                v if isinstance(v, str) else v.decode("latin-1") for v in metadata_values(metadata, key)
            ]
            if not values:
                if not predicate(None):
                    return False
            # A key sent twice must not slip past a policy: a DENY rule holds when any value
            # matches, an ALLOW rule only when every value does.
            elif not (any if deny else all)(predicate(v) for v in values):
                return False
        return True


def _compile_rule(rule: RuleSpec) -> _Rule:
    ids: set[str] | None = None
    prefixes: list[str] = []
    globs: list[str] = []
    if rule.from_ is not None:
        ids = set()
        for source in rule.from_:
            if source.exact is not None:
                ids.add(source.exact)
            elif source.prefix is not None:
                prefixes.append(source.prefix)
            elif source.glob is not None:
                globs.append(source.glob)
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None
    methods: set[str] | None = None
    method_prefixes: list[str] = []
    if rule.methods is not None:
        methods = set()
        for method in rule.methods:
            if method.endswith("*"):
                method_prefixes.append(method[:-1])
            else:
                methods.add(method)
    return _Rule(
        frozenset(ids) if ids is not None else None,
        tuple(prefixes),
        pattern,
        frozenset(methods) if methods is not None else None,
        tuple(method_prefixes),
        tuple((k, v.compile()) for k, v in (rule.metadata or {}).items()),
    )


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str
    action: str
    rules: tuple[_Rule, ...]

    def matches(self, identity: str, method: str, metadata: Metadata) -> bool:
        deny = self.action != "ALLOW"
        return any(rule.holds(identity, method, metadata, deny=deny) for rule in self.rules)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: the policy that decided ('' when none did: no policy, or no ALLOW matched)
    policy: str
    reason: str
    audits: tuple[str, ...] = ()


ALLOWED = Decision(True, "", "no policy selects the service")


class Authorizer:
    """The compiled policies of one service. Immutable; rebuilt when policies change."""

    __slots__ = ("allows", "audits", "denies", "service")

    def __init__(self, service: str, policies: Sequence[_Policy]) -> None:
        self.service = service
        self.denies = tuple(p for p in policies if p.action == "DENY")
        self.audits = tuple(p for p in policies if p.action == "AUDIT")
        self.allows = tuple(p for p in policies if p.action == "ALLOW")

    @property
    def empty(self) -> bool:
        return not (self.denies or self.audits or self.allows)

    def decide(self, identity: str, method: str, metadata: Metadata = ()) -> Decision:
        audits: tuple[str, ...] = ()
        if self.audits:
            audits = tuple(p.name for p in self.audits if p.matches(identity, method, metadata))
        for policy in self.denies:
            if policy.matches(identity, method, metadata):
                return Decision(False, policy.name, f"DENY policy {policy.name} matches", audits)
        if not self.allows:
            if not self.denies:
                return ALLOWED if not audits else Decision(True, "", ALLOWED.reason, audits)
            return Decision(
                True, "", "no DENY policy matches, and no ALLOW policy selects the service", audits
            )
        for policy in self.allows:
            if policy.matches(identity, method, metadata):
                return Decision(True, policy.name, f"ALLOW policy {policy.name} matches", audits)
        names = ", ".join(p.name for p in self.allows)
        return Decision(False, names, f"no ALLOW policy matches ({names})", audits)

    def denial(self, decision: Decision, identity: str, method: str) -> str:
        who = identity or "a caller without a mesh identity (plaintext)"
        return f"gmesh: {who} may not call {method} of {self.service}: {decision.reason}"


def _policy_of(resource: Resource) -> _Policy:
    spec: AuthorizationPolicySpec = resource.spec  # type: ignore[assignment]
    return _Policy(resource.name, spec.action, tuple(_compile_rule(r) for r in spec.rules))


def compile_authorizers(resources: Mapping[str, Resource]) -> dict[str, Authorizer]:
    """Every service's `Authorizer` from the AuthorizationPolicy resources (by name)."""
    by_service: dict[str, list[_Policy]] = {}
    for name in sorted(resources):
        resource = resources[name]
        spec: AuthorizationPolicySpec = resource.spec  # type: ignore[assignment]
        by_service.setdefault(spec.service, []).append(_policy_of(resource))
    return {service: Authorizer(service, policies) for service, policies in by_service.items()}


class Authorizers:
    """`for_service(service)` from whatever snapshot is current; recompiled only when the
    AuthorizationPolicy resources changed (the catalog keeps unchanged ones the same object)."""

    def __init__(self) -> None:
        self._source: Any = None
        self._compiled: dict[str, Authorizer] = {}

    def for_service(self, resources: Mapping[str, Resource] | None, service: str) -> Authorizer:
        if resources is not self._source:
            self._compiled = compile_authorizers(resources or {})
            self._source = resources
        found = self._compiled.get(service)
        if found is None:
            found = self._compiled[service] = Authorizer(service, ())
        return found


def _check(resource: Resource, view: ConfigView) -> Iterator[tuple[tuple[str | int, ...], str]]:
    spec: AuthorizationPolicySpec = resource.spec  # type: ignore[assignment]
    if spec.service == "gmesh-ca":
        yield ("spec", "service"), "the CA authenticates its callers itself (join tokens, certificates)"


def _summary(spec: AuthorizationPolicySpec) -> str:
    return f"{spec.action} {spec.service} ({len(spec.rules)} rule{'s' if len(spec.rules) != 1 else ''})"


AUTHORIZATION_POLICY = Kind(
    name=KIND,
    spec=AuthorizationPolicySpec,
    description="Who may call a service: ALLOW, DENY or AUDIT rules on the caller's verified "
    "identity, the method and request metadata; enforced where calls are received.",
    aliases=("authz",),
    summary=_summary,
    check=_check,
)
