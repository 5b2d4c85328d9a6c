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
from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field

from gmesh.config.kinds import ConfigView, Kind, Resource
from gmesh.config.types import MetadataKey, Name, SpecModel


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
    headers: list[MetadataKey] = Field(
        default_factory=list,
        description="Request metadata keys to record on the call's span as "
        "rpc.grpc.request.metadata.<key> (after redaction).",
    )


class AccessLogSpec(SpecModel):
    """One JSON line per call (docs/access-log.md): off unless enabled."""

    enabled: bool = Field(default=False, description="Log calls to the service.")
    sample_percent: float = Field(
        default=100.0, ge=0, le=100, description="Share of calls logged, in percent."
    )
    headers: list[MetadataKey] = Field(
        default_factory=list, description="Request metadata keys to include in each line (after redaction)."
    )


class TelemetrySpec(SpecModel):
    """What gmesh records about calls to `service` (or, without `service`, to every service)."""

    service: Name | None = Field(
        default=None, description="The mesh service this applies to; omitted: the mesh's defaults."
    )
    metrics: MetricsSpec | None = Field(default=None, description="Golden metrics (on unless disabled).")
    tracing: TracingSpec | None = Field(default=None, description="OpenTelemetry traces of calls.")
    access_log: AccessLogSpec | None = Field(default=None, description="JSON lines, one per call.")


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """What applies to one service once the mesh's defaults and its own Telemetry are merged."""

    metrics: bool = True
    tracing: bool = True
    #: share (0..1) of calls that start a trace to sample
    sample_ratio: float = 0.01
    #: request metadata keys recorded on call spans
    trace_headers: frozenset[str] = frozenset()
    access_log: bool = False
    access_log_ratio: float = 1.0
    access_log_headers: frozenset[str] = frozenset()


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
    settings = DEFAULT
    for spec in (mesh_wide, own):
        if spec is None:
            continue
        changes: dict[str, Any] = {}
        if spec.metrics is not None and "enabled" in spec.metrics.model_fields_set:
            changes["metrics"] = spec.metrics.enabled
        if spec.tracing is not None:
            given = spec.tracing.model_fields_set
            if "enabled" in given:
                changes["tracing"] = spec.tracing.enabled
            if "sample_percent" in given:
                changes["sample_ratio"] = spec.tracing.sample_percent / 100
            if "headers" in given:
                changes["trace_headers"] = frozenset(spec.tracing.headers)
        if spec.access_log is not None:
            given = spec.access_log.model_fields_set
            if "enabled" in given:
                changes["access_log"] = spec.access_log.enabled
            if "sample_percent" in given:
                changes["access_log_ratio"] = spec.access_log.sample_percent / 100
            if "headers" in given:
                changes["access_log_headers"] = frozenset(spec.access_log.headers)
        settings = replace(settings, **changes)
    return settings


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
    logged = (
        "default"
        if spec.access_log is None
        else (f"{spec.access_log.sample_percent:g}%" if spec.access_log.enabled else "off")
    )
    return f"service={spec.service or '*'} metrics={metrics} tracing={tracing} accessLog={logged}"


TELEMETRY = Kind(
    name="Telemetry",
    spec=TelemetrySpec,
    description="What gmesh records about calls (metrics, traces, access log), mesh-wide or per service.",
    aliases=("tel",),
    check=_check,
    summary=_summary,
)
