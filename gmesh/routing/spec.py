"""The `Route` kind as users write it: ordered rules for one service (matches -> weighted backends,
retries, timeouts, mirroring, faults, metadata edits), validated per field.

kind: Route
metadata: {name: orders}
spec:
  service: orders
  rules:
    - name: beta-users
      match:
        method: {prefix: /orders.v1.Orders/}
        metadata: {x-tier: {exact: beta}}
      backends: [{subset: v2, weight: 100}]
    - name: default
      backends: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]
      stickyKey: x-user-id
      timeout: 1s
      retry: {attempts: 3, on: [UNAVAILABLE], perTryTimeout: 300ms}

The built-in `router` plugin registers the kind; `gmesh.routing.table` compiles it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
from pydantic import Field, field_validator, model_validator

from gmesh.config.kinds import ConfigView, Kind, Resource
from gmesh.config.types import Duration, Labels, Name, PositiveDuration, SpecModel
from gmesh.routing import match as m

STATUS_NAMES = {code.name: code for code in grpc.StatusCode}
_METADATA_KEY = re.compile(r"^(:authority|[0-9a-z_.-]+)$")


def status_code(name: str) -> grpc.StatusCode:
    code = STATUS_NAMES.get(name)
    if code is None:
        raise ValueError(f"unknown gRPC status code {name!r} (one of: {', '.join(STATUS_NAMES)})")
    return code


# ---------------------------------------------------------------------------------------------
# The shape users write
# ---------------------------------------------------------------------------------------------


class StringMatch(SpecModel):
    """Exactly one of `exact`, `prefix`, `regex` (the whole value must match the regex)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one(self) -> StringMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of exact, prefix, regex (got {', '.join(given) or 'none'})")
        return self

    @field_validator("regex")
    @classmethod
    def _valid_regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            problem = m.regex_problem(pattern)
            if problem:
                raise ValueError(problem)
        return pattern

    def compile(self) -> m.StringPredicate:
        if self.exact is not None:
            return m.exact(self.exact)
        if self.prefix is not None:
            return m.prefix(self.prefix)
        assert self.regex is not None
        return m.regex(self.regex)

    def describe(self) -> str:
        for k in ("exact", "prefix", "regex"):
            value = getattr(self, k)
            if value is not None:
                return f"{k} {value!r}"
        return "?"


class MetadataMatch(StringMatch):
    """A request metadata value: one of `exact`, `prefix`, `regex`, `present: true`, `absent: true`."""

    present: bool | None = None
    absent: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> MetadataMatch:
        given = [k for k in ("exact", "prefix", "regex", "present", "absent") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of exact, prefix, regex, present, absent "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.present is False or self.absent is False:
            raise ValueError("write `absent: true` instead of `present: false` (and the other way round)")
        return self

    def compile(self) -> m.StringPredicate:
        if self.present:
            return m.present
        if self.absent:
            return m.absent
        return super().compile()

    def describe(self) -> str:
        if self.present:
            return "present"
        if self.absent:
            return "absent"
        return super().describe()


def _metadata_key(key: str) -> str:
    if not _METADATA_KEY.fullmatch(key):
        raise ValueError(f"metadata key {key!r} must be lowercase letters, digits, '-', '_' or '.'")
    return key


class CallerMatch(SpecModel):
    """Who calls: workload labels (each must match) and mesh identity (SPIFFE ID, filled by mTLS)."""

    labels: Labels = Field(default_factory=dict)
    identity: StringMatch | None = None


class Match(SpecModel):
    """Conditions of a rule; every one given must hold."""

    method: StringMatch | None = Field(
        default=None,
        description="The full method path `/pkg.Service/Method`.",
        examples=[{"prefix": "/orders.v1."}],
    )
    metadata: dict[str, MetadataMatch] = Field(
        default_factory=dict,
        description="Request metadata key (lowercase) -> match; `:authority` is the destination service.",
    )
    caller: CallerMatch | None = None

    @field_validator("metadata")
    @classmethod
    def _keys(cls, metadata: dict[str, MetadataMatch]) -> dict[str, MetadataMatch]:
        for key in metadata:
            _metadata_key(key)
        return metadata


class BackendRef(SpecModel):
    """Where calls go: a subset of the destination, another service (or its subset), or with
    neither, every endpoint of the destination."""

    service: Name | None = Field(default=None, description="Another mesh service (default: the route's).")
    subset: Name | None = Field(default=None, description="A subset defined on that service's Service kind.")
    weight: int = Field(default=100, ge=0, le=100, description="Percent of calls (all weights sum to 100).")


class Backoff(SpecModel):
    base: Duration = Field(default=0.025, description="First retry waits up to this (full jitter).")
    max: Duration = Field(default=0.25, description="Cap of the exponential growth.")

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.base > self.max:
            raise ValueError("backoff base must not exceed max")
        return self


class RetryPolicy(SpecModel):
    """Retries of attempts that failed before any response header reached the caller."""

    attempts: int = Field(default=2, ge=1, le=10, description="Attempts in all, the first included.")
    on: list[str] = Field(default_factory=lambda: ["UNAVAILABLE"], description="Status codes to retry on.")
    per_try_timeout: PositiveDuration | None = Field(
        default=None, description="Deadline of each attempt; an attempt that runs out is retried."
    )
    backoff: Backoff = Field(default_factory=Backoff)

    @field_validator("on")
    @classmethod
    def _codes(cls, names: list[str]) -> list[str]:
        for name in names:
            status_code(name)
        if "OK" in names:
            raise ValueError("OK is not a failure to retry on")
        return names


class Mirror(SpecModel):
    """Copy a share of calls to another backend; its answers are dropped (unary calls only)."""

    backend: BackendRef
    percent: float = Field(default=100.0, gt=0, le=100)


class Abort(SpecModel):
    percent: float = Field(gt=0, le=100)
    code: str = Field(description="gRPC status code name, e.g. UNAVAILABLE.")

    @field_validator("code")
    @classmethod
    def _code(cls, name: str) -> str:
        if status_code(name) is grpc.StatusCode.OK:
            raise ValueError("an abort needs a failure code, not OK")
        return name


class Delay(SpecModel):
    percent: float = Field(gt=0, le=100)
    duration: PositiveDuration


class Fault(SpecModel):
    """Injected failures for testing resilience: delay some calls, abort some."""

    abort: Abort | None = None
    delay: Delay | None = None


class MetadataEdit(SpecModel):
    """Request metadata to set (replacing any value) or remove before the call goes upstream."""

    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @field_validator("add")
    @classmethod
    def _add_keys(cls, add: dict[str, str]) -> dict[str, str]:
        for key in add:
            if _metadata_key(key).startswith(":") or key.endswith("-bin"):
                raise ValueError(f"cannot set {key!r}: pseudo-headers and -bin keys are not settable here")
        return add

    @field_validator("remove")
    @classmethod
    def _remove_keys(cls, remove: list[str]) -> list[str]:
        for key in remove:
            _metadata_key(key)
        return remove


class Rule(SpecModel):
    name: Name
    match: Match | None = Field(default=None, description="Conditions; none = every call.")
    backends: list[BackendRef] = Field(
        default_factory=lambda: [BackendRef()],
        min_length=1,
        description="Weighted backends (weights sum to 100). Default: every endpoint of the service.",
    )
    sticky_key: str | None = Field(
        default=None, description="Request metadata key whose value keeps a caller on one backend."
    )
    timeout: PositiveDuration | None = Field(
        default=None, description="Deadline of the whole call (all attempts)."
    )
    retry: RetryPolicy | None = None
    mirror: Mirror | None = None
    fault: Fault | None = None
    request_metadata: MetadataEdit | None = None

    @field_validator("backends")
    @classmethod
    def _weights(cls, refs: list[BackendRef]) -> list[BackendRef]:
        total = sum(b.weight for b in refs)
        if total != 100:
            raise ValueError(f"backend weights sum to {total}; they must sum to 100")
        seen = set()
        for b in refs:
            key = (b.service, b.subset)
            if key in seen:
                raise ValueError(f"backend {_ref_text(b)} is listed twice; merge the weights")
            seen.add(key)
        return refs

    @field_validator("sticky_key")
    @classmethod
    def _sticky(cls, key: str | None) -> str | None:
        return None if key is None else _metadata_key(key)


class RouteSpec(SpecModel):
    """Ordered rules for calls to `service`; the first that matches wins."""

    service: Name = Field(description="The destination mesh service these rules apply to.")
    rules: list[Rule] = Field(min_length=1)

    @field_validator("rules")
    @classmethod
    def _unique_and_reachable(cls, rules: list[Rule]) -> list[Rule]:
        names: set[str] = set()
        catch_all: str | None = None
        for rule in rules:
            if rule.name in names:
                raise ValueError(f"two rules are named {rule.name!r}; rule names must be unique")
            names.add(rule.name)
            if catch_all is not None:
                raise ValueError(
                    f"rule {rule.name!r} can never match: rule {catch_all!r} before it matches every call"
                )
            if _matches_everything(rule.match):
                catch_all = rule.name
        return rules


def _matches_everything(match: Match | None) -> bool:
    if match is None:
        return True
    caller = match.caller
    return (
        match.method is None
        and not match.metadata
        and (caller is None or (not caller.labels and caller.identity is None))
    )


def _ref_text(ref: BackendRef) -> str:
    parts = [f"service {ref.service}" if ref.service else "", f"subset {ref.subset}" if ref.subset else ""]
    return " ".join(p for p in parts if p) or "(all endpoints)"


def _check(resource: Resource, view: ConfigView) -> Iterator[tuple[tuple[str | int, ...], str]]:
    spec: RouteSpec = resource.spec  # type: ignore[assignment]
    for other in view.of_kind("Route").values():
        if other.name != resource.name and getattr(other.spec, "service", None) == spec.service:
            yield (
                ("spec", "service"),
                f"Route/{other.name} already routes service {spec.service!r}; merge them",
            )
    for i, rule in enumerate(spec.rules):
        refs: list[tuple[tuple[str | int, ...], BackendRef]] = [
            (("spec", "rules", i, "backends", j), b) for j, b in enumerate(rule.backends)
        ]
        if rule.mirror is not None:
            refs.append((("spec", "rules", i, "mirror", "backend"), rule.mirror.backend))
        for path, ref in refs:
            if ref.subset is None:
                continue
            service = ref.service or spec.service
            svc = view.get("Service", service)
            subsets = getattr(svc.spec, "subsets", {}) if svc is not None else {}
            if ref.subset not in subsets:
                known = ", ".join(subsets) or "none"
                yield (
                    (*path, "subset"),
                    f"unknown subset {ref.subset!r}: Service/{service} defines {known}",
                )


def _summary(spec: RouteSpec) -> str:
    return f"service={spec.service} rules=" + ",".join(r.name for r in spec.rules)


ROUTE = Kind(
    name="Route",
    spec=RouteSpec,
    description="Ordered routing rules for one service: matches -> weighted backends, retries, timeouts, "
    "mirroring, fault injection.",
    aliases=("routes", "rt"),
    check=_check,
    summary=_summary,
)
