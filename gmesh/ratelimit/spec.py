"""The `RateLimit` kind: how many calls a service takes, in total or per key.

kind: RateLimit
metadata: {name: orders-per-client}
spec:
  service: orders
  methods: ["/orders.v1.Orders/*"]      # optional: which calls it counts (exact, or prefix*)
  metadata: {x-tier: {exact: free}}     # optional: only calls with this metadata
  rate: 100/s                           # N/s, N/min, N/h, N/d
  burst: 20                             # tokens a quiet key may spend at once (default: 1 s of rate)
  key: metadata:x-api-key               # none: one bucket for all; caller; metadata:<key>
  overrides:
    - {key: partner-7, rate: 1000/s, burst: 100}
  mode: enforce                         # or shadow: count and log, never refuse
  status: RESOURCE_EXHAUSTED            # or UNAVAILABLE (what Envoy's local limit sends by default)
  maxKeys: 100000
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

from gmesh.config.kinds import ConfigView, Kind, Resource
from gmesh.config.types import MetadataKey, MethodPattern, Name, SpecModel
from gmesh.routing.spec import MetadataMatch

KIND = "RateLimit"
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
        "d": 86400, "day": 86400}  # fmt: skip
_KEY = re.compile(r"^(caller|metadata:[0-9a-z_.-]+)$")


def parse_rate(value: object) -> float:
    """`100/s`, `6000/min`, `10/h`, `1/d` -> calls per second (> 0)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"rate {value!r}: write it with its window, e.g. {value}/s or {value}/min")
    if not isinstance(value, str):
        raise ValueError("rate must be a string like 100/s or 6000/min")
    match = _RATE.match(value)
    if not match:
        raise ValueError(f"rate {value!r}: expected N/s, N/min, N/h or N/d, e.g. 100/s")
    count, unit = float(match.group(1)), match.group(2)
    if count <= 0:
        raise ValueError(
            f"rate {value!r} must be greater than 0 (to refuse every call, use an AuthorizationPolicy "
            "with action DENY)"
        )
    return count / _PER[unit]


def format_rate(per_second: float) -> str:
    for unit, seconds in (("s", 1), ("min", 60), ("h", 3600), ("d", 86400)):
        count = per_second * seconds
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}/{unit}"
    return f"{per_second:g}/s"


def _key_problem(key: str) -> str | None:
    if _KEY.fullmatch(key):
        return None
    return f"key {key!r}: one of caller, metadata:<lowercase metadata key> (or leave it out)"


LimitKey = Annotated[str, AfterValidator(lambda k: _raise(_key_problem(k), k))]
"""What a RateLimit or Quota counts per: `caller` or `metadata:<key>`."""


def _raise(problem: str | None, value: str) -> str:
    if problem:
        raise ValueError(problem)
    return value


Rate = Annotated[
    float,
    BeforeValidator(parse_rate),
    PlainSerializer(format_rate, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": _RATE.pattern, "examples": ["100/s", "6000/min"]}),
]


class OverrideSpec(SpecModel):
    """Another rate (and burst) for one named key."""

    key: str = Field(min_length=1, description="The key's value (a SPIFFE ID, a metadata value).")
    rate: Rate = Field(description="Calls per window for this key: N/s, N/min, N/h, N/d.")
    burst: int | None = Field(default=None, ge=1, description="Tokens this key may spend at once.")


class MessagesSpec(SpecModel):
    """A limit on the request messages callers send on streams (client-streaming and bidi calls)."""

    rate: Rate = Field(description="Messages per window: N/s, N/min, N/h, N/d.")
    burst: int | None = Field(
        default=None, ge=1, description="Messages at once (default: one second of rate)."
    )
    per: Literal["stream", "key"] = Field(
        default="stream",
        description="stream: each stream has its own bucket; key: the streams of one key (the limit's "
        "key) share one.",
    )


class RateLimitSpec(SpecModel):
    """A limit on a service's calls, in total or per key, enforced by each gmesh process."""

    service: Name = Field(description="The mesh service whose calls this limit counts.")
    methods: list[MethodPattern] | None = Field(
        default=None, min_length=1, description="Method paths, or prefixes ending in '*' (default: all)."
    )
    metadata: dict[MetadataKey, MetadataMatch] | None = Field(
        default=None,
        description="Only calls whose request metadata match (exact, prefix, regex, present, absent).",
    )
    rate: Rate = Field(description="Calls per window: N/s, N/min, N/h or N/d.")
    burst: int | None = Field(
        default=None,
        ge=1,
        description="Tokens a key may spend at once (default: one second of rate, at least 1).",
    )
    key: LimitKey | None = Field(
        default=None,
        description="What a bucket is per: none (one bucket for all calls), `caller` (the caller's "
        "verified identity, else its labels, else its address), or `metadata:<key>`.",
    )
    overrides: list[OverrideSpec] = Field(default_factory=list, description="Other limits for named keys.")
    messages: MessagesSpec | None = Field(
        default=None,
        description="Also limit the request messages of streaming calls (per stream, or per key); a "
        "stream over it ends with the limit's status.",
    )
    mode: Literal["enforce", "shadow"] = Field(
        default="enforce", description="shadow: count and log would-be refusals, never refuse."
    )
    scope: Literal["process", "global"] = Field(
        default="process",
        description="process: each gmesh process enforces the rate itself; global: the rate holds "
        "across every process of the mesh (each takes a fair share, through etcd).",
    )
    on_store_unavailable: Literal["share", "allow", "deny"] = Field(
        default="share",
        description="global limits while etcd cannot be reached: keep the last share, stop "
        "limiting, or refuse every call.",
    )
    status: Literal["RESOURCE_EXHAUSTED", "UNAVAILABLE"] = Field(
        default="RESOURCE_EXHAUSTED", description="The status of a refused call."
    )
    max_keys: int = Field(
        default=100_000, ge=1, le=10_000_000, description="Buckets kept per process (bounded memory)."
    )

    @model_validator(mode="after")
    def _global_in_total(self) -> RateLimitSpec:
        if self.scope == "global" and self.key is not None:
            raise ValueError(
                "a global limit counts calls in total (no key): per-key limits are per process "
                "(scope: process); give a key a global limit of its own with a metadata match"
            )
        return self

    @model_validator(mode="after")
    def _overrides(self) -> RateLimitSpec:
        if self.overrides and self.key is None:
            raise ValueError("overrides need a key (they name keys' values)")
        seen = set()
        for override in self.overrides:
            if override.key in seen:
                raise ValueError(f"overrides name key {override.key!r} twice")
            seen.add(override.key)
        return self

    def burst_of(self, rate: float, burst: int | None) -> int:
        return burst if burst is not None else max(1, math.ceil(rate))


def _check(resource: Resource, view: ConfigView) -> Iterator[tuple[tuple[str | int, ...], str]]:
    spec: RateLimitSpec = resource.spec  # type: ignore[assignment]
    if spec.service == "gmesh-ca":
        yield ("spec", "service"), "the CA is not rate limited by RateLimit resources"


def _summary(spec: RateLimitSpec) -> str:
    parts = [f"{spec.service} {format_rate(spec.rate)}", f"burst {spec.burst_of(spec.rate, spec.burst)}"]
    if spec.key:
        parts.append(f"per {spec.key}")
    if spec.scope == "global":
        parts.append("global")
    if spec.mode == "shadow":
        parts.append("shadow")
    return " ".join(parts)


RATE_LIMIT = Kind(
    name=KIND,
    spec=RateLimitSpec,
    description="A limit on a service's calls (rate and burst), in total or per key (caller, "
    "metadata), enforced or in shadow mode, by every gmesh process that receives or sends them.",
    aliases=("rl",),
    summary=_summary,
    check=_check,
)
