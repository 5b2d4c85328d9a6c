"""Compiled routes: a `Route` turned into plain predicates, a `Split` and policies, once per
config change. The ROUTE filter and `gmesh explain` run these same objects.

The first rule whose every condition holds wins; a rule without `match` matches every
call. A call no rule matches goes to every endpoint of the service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from gmesh.chain.call import Call
from gmesh.chain.metadata import Metadata
from gmesh.config.types import format_duration
from gmesh.routing import match as m
from gmesh.routing.spec import Match, RouteSpec, Rule, status_code
from gmesh.routing.split import Split

if TYPE_CHECKING:
    from gmesh.config.kinds import Resource
    from gmesh.discovery.catalog import MeshSnapshot

#: `(service, subset)`: where a call goes; subset None = every endpoint of the service.
BackendKey = tuple[str, str | None]

Condition = tuple[str, Callable[[Call[Any]], bool]]


@dataclass(frozen=True, slots=True)
class CompiledRetry:
    attempts: int
    on: frozenset[grpc.StatusCode]
    per_try_timeout: float | None
    backoff_base: float
    backoff_max: float

    def describe(self) -> str:
        text = f"{self.attempts} attempts on {','.join(sorted(c.name for c in self.on))}"
        if self.per_try_timeout is not None:
            text += f", {format_duration(self.per_try_timeout)} per try"
        return text + f", backoff {format_duration(self.backoff_base)}..{format_duration(self.backoff_max)}"


@dataclass(frozen=True, slots=True)
class CompiledFault:
    abort_share: float
    abort_code: grpc.StatusCode
    delay_share: float
    delay: float


class CompiledRule:
    """One rule, ready to run: conditions, split, and the policies the next phases read."""

    __slots__ = (
        "add",
        "conditions",
        "fault",
        "index",
        "mirror",
        "mirror_share",
        "name",
        "remove",
        "retry",
        "split",
        "sticky_key",
        "timeout",
    )

    def __init__(self, index: int, rule: Rule, service: str) -> None:
        self.index = index
        self.name = rule.name
        self.conditions: tuple[Condition, ...] = tuple(_conditions(rule.match, service))
        keys: list[BackendKey] = [(b.service or service, b.subset) for b in rule.backends]
        self.split: Split[BackendKey] = Split(keys, [b.weight for b in rule.backends])
        self.sticky_key = rule.sticky_key
        self.timeout = rule.timeout
        r = rule.retry
        self.retry = None
        if r is not None:
            codes = frozenset(map(status_code, r.on))
            self.retry = CompiledRetry(r.attempts, codes, r.per_try_timeout, r.backoff.base, r.backoff.max)
        self.mirror: BackendKey | None = None
        self.mirror_share = 0.0
        if rule.mirror is not None:
            self.mirror = (rule.mirror.backend.service or service, rule.mirror.backend.subset)
            self.mirror_share = rule.mirror.percent / 100
        f = rule.fault
        self.fault = (
            None
            if f is None
            else CompiledFault(
                f.abort.percent / 100 if f.abort else 0.0,
                status_code(f.abort.code) if f.abort else grpc.StatusCode.OK,
                f.delay.percent / 100 if f.delay else 0.0,
                f.delay.duration if f.delay else 0.0,
            )
        )
        edit = rule.request_metadata
        self.add: Metadata = tuple(edit.add.items()) if edit else ()
        self.remove = frozenset(edit.remove) | frozenset(k for k, _ in self.add) if edit else frozenset()

    def matches(self, call: Call[Any]) -> bool:
        # A plain loop, not all(<genexpr>): no generator object per call.
        for _, test in self.conditions:  # noqa: SIM110
            if not test(call):
                return False
        return True

    def failed_condition(self, call: Call[Any]) -> str | None:
        """The first condition that does not hold for `call`, described (None: the rule matches)."""
        for description, test in self.conditions:
            if not test(call):
                return description
        return None

    def choose(self, call: Call[Any]) -> BackendKey:
        split = self.split
        if self.sticky_key is not None:
            value = m.metadata_value(call.metadata, self.sticky_key)
            if value is not None:
                return split.for_key(value)
        return split.next()

    def edit(self, metadata: Metadata) -> Metadata:
        return tuple((k, v) for k, v in metadata if k not in self.remove) + self.add


def _conditions(match: Match | None, service: str) -> Iterator[Condition]:
    if match is None:
        return
    if match.method is not None:
        test = match.method.compile()
        yield f"method {match.method.describe()}", lambda call: test(call.method)
    for key, mm in match.metadata.items():
        vtest = mm.compile()
        if key == ":authority":
            yield f"metadata {key} {mm.describe()}", lambda call, t=vtest: t(call.service)  # type: ignore[misc]
        else:
            yield (
                f"metadata {key} {mm.describe()}",
                lambda call, k=key, t=vtest: t(m.metadata_value(call.metadata, k)),  # type: ignore[misc]
            )
    if match.caller is not None:
        for key, value in match.caller.labels.items():
            yield (
                f"caller label {key}={value}",
                lambda call, k=key, v=value: call.caller.labels.get(k) == v,  # type: ignore[misc]
            )
        if match.caller.identity is not None:
            itest = match.caller.identity.compile()
            yield (
                f"caller identity {match.caller.identity.describe()}",
                lambda call: itest(call.caller.identity or None),
            )


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The compiled rules of one service, in order."""

    service: str
    route: str
    rules: tuple[CompiledRule, ...]

    def match(self, call: Call[Any]) -> CompiledRule | None:
        for rule in self.rules:
            if rule.matches(call):
                return rule
        return None

    def explain(self, call: Call[Any]) -> list[tuple[CompiledRule, str | None]]:
        """Each rule up to the first match, with the condition that failed (None: matched)."""
        out: list[tuple[CompiledRule, str | None]] = []
        for rule in self.rules:
            failed = rule.failed_condition(call)
            out.append((rule, failed))
            if failed is None:
                break
        return out


def route_of(service: str, snapshot: MeshSnapshot) -> Resource | None:
    """The Route resource of `service` (at most one per service: apply refuses a second)."""
    for resource in snapshot.resources.get("Route", {}).values():
        if getattr(resource.spec, "service", None) == service:
            return resource
    return None


def targets(resource: Resource) -> set[str]:
    """The services a Route sends calls or mirrored copies to, its own service first among them."""
    spec: RouteSpec = resource.spec  # type: ignore[assignment]
    found = {spec.service}
    for rule in spec.rules:
        found.update(b.service for b in rule.backends if b.service)
        if rule.mirror is not None and rule.mirror.backend.service:
            found.add(rule.mirror.backend.service)
    return found


def compile_table(service: str, snapshot: MeshSnapshot) -> RouteTable | None:
    """The route table of `service` in `snapshot`, or None when no Route names it."""
    resource = route_of(service, snapshot)
    if resource is None:
        return None
    spec: RouteSpec = resource.spec  # type: ignore[assignment]
    return RouteTable(
        service, resource.name, tuple(CompiledRule(i, r, service) for i, r in enumerate(spec.rules))
    )
