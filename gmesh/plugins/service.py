"""Built-in plugin: the `Service` kind — per-service policy (subsets by endpoint labels, default timeout).

kind: Service
metadata: {name: orders}
spec:
  subsets: {v1: {version: v1}, v2: {version: v2}}
  timeout: 2s
"""

from __future__ import annotations

from pydantic import Field, field_validator

from gmesh.config.kinds import Kind, KindRegistry
from gmesh.config.types import Duration, Labels, Name, SpecModel
from gmesh.hookspecs import hookimpl


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
