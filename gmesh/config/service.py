"""The `Service` kind: per-service policy (subsets by endpoint labels, default timeout, balancer,
health checks, outlier detection, circuit breaker, retry budget, stream age).

The built-in `service` plugin registers it; the outbound core reads it.

kind: Service
metadata: {name: orders}
spec:
  subsets: {v1: {version: v1}, v2: {version: v2}}
  timeout: 2s
  retryBudget: {percent: 20, minPerSecond: 10, window: 10s}
  balancer: {policy: ring_hash, hashKey: x-user-id}
  healthCheck: {interval: 5s, timeout: 1s, healthyThreshold: 2, unhealthyThreshold: 3}
  outlierDetection: {consecutiveErrors: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}
  circuitBreaker: {maxRequests: 100, maxPending: 50, maxRetries: 10}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gmesh.balancer import Policy
from gmesh.config.kinds import Kind
from gmesh.config.types import Duration, Labels, Name, PositiveDuration, SpecModel


class RetryBudgetSpec(SpecModel):
    """Retries allowed to calls of this service: at most `percent` of the calls made within
    `window`, plus `minPerSecond` (so low traffic can still retry)."""

    percent: float = Field(default=20.0, ge=0, le=1000, description="Retries as a percentage of calls.")
    min_per_second: float = Field(default=10.0, ge=0, description="Retries allowed per second regardless.")
    window: Duration = Field(default=10.0, description="How far back calls and retries are counted (>= 1s).")

    @field_validator("window")
    @classmethod
    def _window(cls, window: float) -> float:
        if window < 1:
            raise ValueError("window must be at least 1s")
        return window


class PolicySpec(SpecModel):
    """A balancing policy, and for the hashing ones the request metadata key to hash."""

    policy: Policy = Field(default="weighted_round_robin", description="How an endpoint is picked per call.")
    hash_key: str | None = Field(
        default=None, description="Request metadata key hashed by ring_hash and maglev (e.g. x-user-id)."
    )

    @model_validator(mode="after")
    def _hash_key(self) -> PolicySpec:
        hashing = self.policy in ("ring_hash", "maglev")
        if hashing and not self.hash_key:
            raise ValueError(f"policy {self.policy} needs hashKey: the request metadata key to hash")
        if not hashing and self.hash_key:
            raise ValueError(f"hashKey only applies to ring_hash and maglev, not {self.policy}")
        if self.hash_key is not None and self.hash_key != self.hash_key.lower():
            raise ValueError(f"hashKey {self.hash_key!r} must be lowercase (gRPC metadata keys are)")
        return self


class ZoneAwareSpec(SpecModel):
    min_healthy_percent: float = Field(
        default=70.0,
        gt=0,
        le=100,
        description="Keep calls in the caller's zone while at least this share of its endpoints is usable.",
    )


class BalancerSpec(PolicySpec):
    """The service's balancer; `subsets` override it per subset; `zoneAware` prefers the caller's zone."""

    subsets: dict[Name, PolicySpec] = Field(
        default_factory=dict, description="Subset name -> its own policy."
    )
    zone_aware: ZoneAwareSpec | None = Field(
        default=None, description="Prefer endpoints in the caller's zone (proxy --zone, channel zone=)."
    )


class HealthCheckSpec(SpecModel):
    """Active health checks (grpc.health.v1) from every proxy and channel to each endpoint."""

    interval: PositiveDuration = Field(default=5.0, description="Time between checks of one endpoint.")
    timeout: PositiveDuration = Field(default=1.0, description="A check not answered within this fails.")
    healthy_threshold: int = Field(default=2, ge=1, description="Passing checks in a row to take it back.")
    unhealthy_threshold: int = Field(default=3, ge=1, description="Failing checks in a row to take it out.")
    jitter_percent: float = Field(default=10.0, ge=0, le=100, description="Random extra on each interval.")
    service: str = Field(default="", description="The service name asked about ('' = the whole server).")

    @model_validator(mode="after")
    def _times(self) -> HealthCheckSpec:
        if self.timeout > self.interval:
            raise ValueError("timeout must not be longer than interval")
        return self


class FailurePercentageSpec(SpecModel):
    threshold: float = Field(
        default=85.0, gt=0, le=100, description="Eject at or above this failure percentage."
    )
    min_requests: int = Field(
        default=50, ge=1, description="Only endpoints with this many calls per interval."
    )


class SuccessRateSpec(SpecModel):
    stdev_factor: float = Field(default=1.9, gt=0, description="Eject below mean - factor x stdev.")
    min_requests: int = Field(
        default=100, ge=1, description="Only endpoints with this many calls per interval."
    )
    min_hosts: int = Field(default=5, ge=2, description="Only when this many endpoints qualify.")


class OutlierDetectionSpec(SpecModel):
    """Passive health: eject endpoints whose calls fail, for a time that grows with each ejection."""

    consecutive_errors: int | None = Field(default=5, ge=1, description="Eject after this many in a row.")
    interval: PositiveDuration = Field(default=10.0, description="How often the percentage modes look.")
    base_ejection_time: PositiveDuration = Field(
        default=30.0, description="First ejection; n-th lasts n times this."
    )
    max_ejection_time: Duration = Field(default=300.0, description="Cap of an ejection's length.")
    max_ejection_percent: float = Field(default=10.0, ge=0, le=100, description="At most this share ejected.")
    failure_percentage: FailurePercentageSpec | None = None
    success_rate: SuccessRateSpec | None = None

    @model_validator(mode="after")
    def _times(self) -> OutlierDetectionSpec:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("maxEjectionTime must not be shorter than baseEjectionTime")
        return self


class CircuitBreakerSpec(SpecModel):
    """Limits that fail calls fast instead of piling them on a struggling service."""

    max_requests: int | None = Field(default=None, ge=1, description="Calls in flight to the service.")
    max_pending: int = Field(default=0, ge=0, description="Calls waiting for a slot above maxRequests.")
    max_retries: int | None = Field(default=None, ge=0, description="Retries in flight to the service.")
    max_requests_per_endpoint: int | None = Field(
        default=None, ge=1, description="Calls in flight to one endpoint (busy ones are skipped)."
    )


TlsMode = Literal["DISABLED", "PERMISSIVE", "STRICT"]


class TlsSpec(SpecModel):
    """Mutual TLS where the service's calls are received (inbound proxies, `gmesh.server_interceptors`)."""

    mode: TlsMode = Field(
        default="PERMISSIVE",
        description="STRICT: mTLS only (plaintext calls refused, UNAUTHENTICATED); PERMISSIVE: "
        "both, each call recorded as one or the other; DISABLED: plaintext only (no mTLS offered).",
    )


class ServiceSpec(SpecModel):
    """Policy of one mesh service; the service's endpoints come from registrations."""

    subsets: dict[Name, Labels] = Field(
        default_factory=dict,
        description="Subset name -> endpoint labels it selects (every label must match).",
        examples=[{"v1": {"version": "v1"}, "v2": {"version": "v2"}}],
    )
    timeout: PositiveDuration | None = Field(
        default=None,
        description="Default deadline for calls to this service when the caller sets none (e.g. 2s).",
    )

    retry_budget: RetryBudgetSpec | None = Field(
        default=None,
        description="Cap on retries of this service's calls (default: 20% of calls + 10/s over 10s).",
    )

    balancer: BalancerSpec = Field(default_factory=BalancerSpec, description="How endpoints are picked.")
    health_check: HealthCheckSpec | None = Field(default=None, description="Active grpc.health.v1 checks.")
    outlier_detection: OutlierDetectionSpec | None = Field(default=None, description="Passive health.")
    circuit_breaker: CircuitBreakerSpec | None = Field(default=None, description="Fail-fast limits.")
    panic_threshold: float = Field(
        default=50.0,
        ge=0,
        le=100,
        description="Below this share of usable endpoints, balance over all of them (panic mode).",
    )
    max_stream_age: PositiveDuration | None = Field(
        default=None,
        description="Streams end after this long, between messages, with UNAVAILABLE (reconnect).",
    )
    tls: TlsSpec = Field(default_factory=TlsSpec, description="Mutual TLS mode of the service's endpoints.")

    @field_validator("balancer")
    @classmethod
    def _balancer_subsets_exist(cls, balancer: BalancerSpec, info: ValidationInfo) -> BalancerSpec:
        subsets = info.data.get("subsets") or {}
        unknown = [name for name in balancer.subsets if name not in subsets]
        if unknown:
            raise ValueError(
                f"subsets names {unknown[0]!r}, which is not a subset of this Service (defined: "
                f"{', '.join(subsets) or 'none'})"
            )
        return balancer

    @field_validator("subsets")
    @classmethod
    def _subsets_select_something(cls, subsets: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        empty = [name for name, selector in subsets.items() if not selector]
        if empty:
            raise ValueError(
                f"subset {empty[0]!r} selects no labels, so it would match every endpoint; "
                "give it labels, e.g. {version: v2}"
            )
        return subsets


def _summary(spec: ServiceSpec) -> str:
    parts = []
    if spec.subsets:
        parts.append("subsets=" + ",".join(spec.subsets))
    if spec.timeout is not None:
        parts.append(f"timeout={spec.model_dump(mode='json')['timeout']}")
    if "balancer" in spec.model_fields_set:
        parts.append(f"balancer={spec.balancer.policy}")
    for name in ("health_check", "outlier_detection", "circuit_breaker", "retry_budget"):
        if getattr(spec, name) is not None:
            parts.append(name.replace("_", "-"))
    if "tls" in spec.model_fields_set:
        parts.append(f"tls={spec.tls.mode}")
    return " ".join(parts)


SERVICE = Kind(
    name="Service",
    spec=ServiceSpec,
    description="Policy of one mesh service: subsets by label, balancer, health checks, outlier "
    "detection, circuit breaker, timeout, retry budget.",
    aliases=("svc",),
    summary=_summary,
)
