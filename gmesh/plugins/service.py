"""Built-in plugin: the `Service` kind — per-service policy (subsets by endpoint labels, default timeout).

kind: Service
metadata: {name: orders}
spec:
  subsets: {v1: {version: v1}, v2: {version: v2}}
  timeout: 2s
  retryBudget: {percent: 20, minPerSecond: 10, window: 10s}
"""

from __future__ import annotations

from pydantic import Field, field_validator

from gmesh.config.kinds import Kind, KindRegistry
from gmesh.config.types import Duration, Labels, Name, SpecModel
from gmesh.hookspecs import hookimpl


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


class ServiceSpec(SpecModel):
    """Policy of one mesh service; the service's endpoints come from registrations."""

    subsets: dict[Name, Labels] = Field(
        default_factory=dict,
        description="Subset name -> endpoint labels it selects (every label must match).",
        examples=[{"v1": {"version": "v1"}, "v2": {"version": "v2"}}],
    )
    timeout: Duration | None = Field(
        default=None,
        description="Default deadline for calls to this service when the caller sets none (e.g. 2s).",
    )

    retry_budget: RetryBudgetSpec | None = Field(
        default=None,
        description="Cap on retries of this service's calls (default: 20% of calls + 10/s over 10s).",
    )

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

    @field_validator("timeout")
    @classmethod
    def _positive(cls, timeout: float | None) -> float | None:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be greater than 0")
        return timeout


def _summary(spec: ServiceSpec) -> str:
    parts = []
    if spec.subsets:
        parts.append("subsets=" + ",".join(spec.subsets))
    if spec.timeout is not None:
        parts.append(f"timeout={spec.model_dump(mode='json')['timeout']}")
    return " ".join(parts)


SERVICE = Kind(
    name="Service",
    spec=ServiceSpec,
    description="Policy of one mesh service: subsets of its endpoints by label, default timeout.",
    aliases=("svc",),
    summary=_summary,
)


@hookimpl(trylast=True)
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(SERVICE)
