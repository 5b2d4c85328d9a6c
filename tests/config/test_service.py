"""The Service kind's balancing and resilience fields: what loads, and what `gmesh apply` rejects."""

from __future__ import annotations

import functools
from textwrap import dedent

import pytest

from gmesh.config.kinds import ConfigView, KindRegistry, Resource
from gmesh.config.loader import load_text
from gmesh.config.validate import validate_documents
from gmesh.errors import ConfigError
from gmesh.pluginmanager import Plugins

FILE = "svc.yaml"


@functools.cache
def kinds() -> KindRegistry:
    return Plugins.builtin_only().config_kinds()


def load(text: str) -> list[Resource]:
    docs, problems = load_text(text, FILE)
    assert problems == []
    return validate_documents(docs, kinds(), ConfigView({}))


def service(spec: str) -> str:
    body = dedent(spec).strip("\n")
    indented = "\n".join("  " + line for line in body.splitlines())
    return (
        f"kind: Service\nmetadata: {{name: orders}}\nspec:\n  subsets: {{v1: {{version: v1}}}}\n{indented}\n"
    )


def one_problem(text: str) -> tuple[int | None, str, str]:
    with pytest.raises(ConfigError) as error:
        load(text)
    [problem] = error.value.problems
    assert problem.file == FILE
    return problem.line, problem.path, problem.message


def test_the_issue_example_loads() -> None:
    [resource] = load(
        service(
            """
            balancer: {policy: ring_hash, hashKey: x-user-id}
            healthCheck: {interval: 5s, timeout: 1s, healthyThreshold: 2, unhealthyThreshold: 3}
            outlierDetection: {consecutiveErrors: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}
            circuitBreaker: {maxRequests: 100, maxPending: 50, maxRetries: 10}
            """
        )
    )
    spec = resource.spec
    assert spec.balancer.policy == "ring_hash" and spec.balancer.hash_key == "x-user-id"  # type: ignore[attr-defined]
    assert spec.health_check.unhealthy_threshold == 3  # type: ignore[attr-defined]
    assert spec.outlier_detection.base_ejection_time == 30.0  # type: ignore[attr-defined]
    assert spec.circuit_breaker.max_pending == 50  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "line", "path", "message"),
    [
        ("balancer: {policy: fastest}", 5, "spec.balancer.policy", "input should be 'round_robin'"),
        ("balancer: {policy: ring_hash}", 5, "spec.balancer", "policy ring_hash needs hashKey"),
        ("balancer: {policy: least_request, hashKey: x-id}", 5, "spec.balancer", "hashKey only applies"),
        ("balancer:\n  subsets: {v9: {policy: random}}", 5, "spec.balancer", "subsets names 'v9'"),
        ("healthCheck: {interval: 1s, timeout: 2s}", 5, "spec.healthCheck", "timeout must not be longer"),
        (
            "healthCheck: {unhealthyThreshold: 0}",
            5,
            "spec.healthCheck.unhealthyThreshold",
            "greater than or equal to 1",
        ),
        (
            "outlierDetection: {maxEjectionPercent: 150}",
            5,
            "spec.outlierDetection.maxEjectionPercent",
            "less than or equal to 100",
        ),
        (
            "outlierDetection: {baseEjectionTime: 1m, maxEjectionTime: 10s}",
            5,
            "spec.outlierDetection",
            "maxEjectionTime must not",
        ),
        (
            "circuitBreaker: {maxRequests: 0}",
            5,
            "spec.circuitBreaker.maxRequests",
            "greater than or equal to 1",
        ),
        ("circuitBreaker: {maxPendng: 5}", 5, "spec.circuitBreaker.maxPendng", "did you mean 'maxPending'"),
        ("maxStreamAge: 0s", 5, "spec.maxStreamAge", "greater than 0"),
    ],
)
def test_bad_balancing_and_breaker_config_is_rejected_with_line_and_field(
    spec: str, line: int, path: str, message: str
) -> None:
    got_line, got_path, got_message = one_problem(service(spec))
    assert (got_line, got_path) == (line, path), got_message
    assert message in got_message
