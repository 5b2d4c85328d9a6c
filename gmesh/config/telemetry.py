"""The `Telemetry` kind: what gmesh records about calls, mesh-wide or per service.

One Telemetry without `service` sets the mesh's defaults; one naming a service overrides
them for that service, field by field (a field it does not give keeps the mesh's value).
Changes apply to running proxies and channels at once (the chains of the services they
touch are rebuilt).

kind: Telemetry
metadata: {name: mesh-defaults}
spec:
  metrics: {enabled: true}
  tracing: {samplePercent: 1}
---
kind: Telemetry
metadata: {name: no-metrics-for-batch}
spec:
  service: batch
  metrics: {enabled: false}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pydantic import Field

from gmesh.config.kinds import ConfigView, Kind, Resource
from gmesh.config.types import Name, SpecModel


class MetricsSpec(SpecModel):
    """Golden metrics of calls (`gmesh_calls_total`, durations, attempts, ...)."""

    enabled: bool = Field(default=True, description="Count calls to the service in the metrics.")


class TracingSpec(SpecModel):
    """OpenTelemetry spans of calls: a call whose caller's trace is sampled is always traced
    (parent-based); a call that starts a trace is sampled at `samplePercent`."""

    enabled: bool = Field(default=True, description="Trace calls to the service (when a tracer is set up).")
    sample_percent: float = Field(
        default=1.0, ge=0, le=100, description="Share of calls that start a trace to sample, in percent."
    )


class TelemetrySpec(SpecModel):
    """What gmesh records about calls to `service` (or, without `service`, to every service)."""

    service: Name | None = Field(
        default=None, description="The mesh service this applies to; omitted: the mesh's defaults."
    )
    metrics: MetricsSpec | None = Field(default=None, description="Golden metrics (on unless disabled).")
    tracing: TracingSpec | None = Field(default=None, description="OpenTelemetry traces of calls.")


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """What applies to one service once the mesh's defaults and its own Telemetry are merged."""

    metrics: bool = True
    tracing: bool = True
    #: share (0..1) of calls that start a trace to sample
    sample_ratio: float = 0.01


DEFAULT = TelemetrySettings()


def telemetry_of(resources: Mapping[str, Resource], service: str) -> TelemetrySettings:
    """The settings for calls to `service`, given every `Telemetry` resource."""
    mesh_wide: TelemetrySpec | None = None
    own: TelemetrySpec | None = None
    for resource in resources.values():
        found = resource.spec
        if not isinstance(found, TelemetrySpec):
            continue
        if found.service is None:
            mesh_wide = found
        elif found.service == service:
            own = found
    metrics, tracing, ratio = DEFAULT.metrics, DEFAULT.tracing, DEFAULT.sample_ratio
    for spec in (mesh_wide, own):
        if spec is None:
            continue
        if spec.metrics is not None and "enabled" in spec.metrics.model_fields_set:
            metrics = spec.metrics.enabled
        if spec.tracing is not None:
            given = spec.tracing.model_fields_set
            if "enabled" in given:
                tracing = spec.tracing.enabled
            if "sample_percent" in given:
                ratio = spec.tracing.sample_percent / 100
    return TelemetrySettings(metrics=metrics, tracing=tracing, sample_ratio=ratio)


def _check(resource: Resource, view: ConfigView) -> Iterator[tuple[tuple[str | int, ...], str]]:
    spec: TelemetrySpec = resource.spec  # type: ignore[assignment]
    for other in view.of_kind("Telemetry").values():
        if other.name != resource.name and getattr(other.spec, "service", None) == spec.service:
            what = "the mesh's defaults" if spec.service is None else f"service {spec.service!r}"
            yield (("spec", "service"), f"Telemetry/{other.name} already sets {what}; merge them")


def _summary(spec: TelemetrySpec) -> str:
    metrics = "default" if spec.metrics is None else ("on" if spec.metrics.enabled else "off")
    tracing = (
        "default"
        if spec.tracing is None
        else (f"{spec.tracing.sample_percent:g}%" if spec.tracing.enabled else "off")
    )
    return f"service={spec.service or '*'} metrics={metrics} tracing={tracing}"


TELEMETRY = Kind(
    name="Telemetry",
    spec=TelemetrySpec,
    description="What gmesh records about calls (metrics, traces), mesh-wide or per service.",
    aliases=("tel",),
    check=_check,
    summary=_summary,
)
