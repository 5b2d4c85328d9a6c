"""From YAML documents to resources, or to every problem with its file, line and field."""

from collections.abc import Iterator
from textwrap import dedent

import pytest

from gmesh.config.kinds import ConfigView, Kind, KindRegistry, Resource, Source
from gmesh.config.loader import load_text
from gmesh.config.service import SERVICE, ServiceSpec
from gmesh.config.types import Name, SpecModel
from gmesh.config.validate import parse_stored, validate_documents
from gmesh.errors import ConfigError, Problem


class RouteSpec(SpecModel):
    service: Name
    weights: dict[Name, int] = {}


def _check_route(resource: Resource, view: ConfigView) -> Iterator[tuple[str, str]]:
    spec = resource.spec
    assert isinstance(spec, RouteSpec)
    target = view.get("Service", spec.service)
    if target is None:
        yield "spec.service", f"no Service {spec.service!r}"
        return
    assert isinstance(target.spec, ServiceSpec)
    for subset in spec.weights:
        if subset not in target.spec.subsets:
            yield f"spec.weights.{subset}", f"Service {spec.service!r} has no subset {subset!r}"


ROUTE = Kind(name="Route", spec=RouteSpec, description="test kind", check=_check_route)

KINDS = KindRegistry()
KINDS.add(SERVICE)
KINDS.add(ROUTE)

EMPTY = ConfigView({})


def validate(*files: tuple[str, str], current: ConfigView = EMPTY) -> list[Resource]:
    docs = []
    for file, text in files:
        found, problems = load_text(dedent(text), file)
        assert problems == []
        docs.extend(found)
    return validate_documents(docs, KINDS, current)


def problems_of(*files: tuple[str, str], current: ConfigView = EMPTY) -> list[Problem]:
    with pytest.raises(ConfigError) as error:
        validate(*files, current=current)
    return error.value.problems


def one_problem(text: str) -> tuple[int | None, str, str]:
    [problem] = problems_of(("svc.yaml", text))
    assert problem.file == "svc.yaml"
    return problem.line, problem.path, problem.message


# -- valid documents ---------------------------------------------------------------------------

FULL_SERVICE = """\
    kind: Service
    metadata:
      name: orders
      labels: {team: pay}
      annotations: {owner: "alice@example.com"}
    spec:
      subsets:
        v1: {version: v1}
        v2: {version: v2, example.com/tier: gold}
      timeout: 2s
    """


def test_valid_document_round_trips() -> None:
    [resource] = validate(("svc.yaml", FULL_SERVICE))
    assert (resource.kind, resource.name, resource.ref) == ("Service", "orders", "Service/orders")
    assert resource.source == Source("svc.yaml", 1)
    assert isinstance(resource.spec, ServiceSpec)
    assert resource.spec.timeout == 2.0
    [doc], _ = load_text(dedent(FULL_SERVICE), "svc.yaml")
    assert resource.document() == doc.data


@pytest.mark.parametrize(
    ("text", "document"),
    [
        (
            "kind: Service\nmetadata: {name: orders}\n",
            {"kind": "Service", "metadata": {"name": "orders"}, "spec": {}},
        ),
        (
            "apiVersion: gmesh/v1\nkind: Service\nmetadata: {name: orders}\nspec: {timeout: 300ms}\n",
            {"kind": "Service", "metadata": {"name": "orders"}, "spec": {"timeout": "300ms"}},
        ),
    ],
)
def test_document_has_only_the_fields_set(text: str, document: dict[str, object]) -> None:
    [resource] = validate(("svc.yaml", text))
    assert resource.document() == document


def test_many_documents_many_resources() -> None:
    resources = validate(
        ("a.yaml", "kind: Service\nmetadata: {name: orders}\n---\nkind: Service\nmetadata: {name: pay}\n"),
        ("b.yaml", "kind: Route\nmetadata: {name: orders}\nspec: {service: orders}\n"),
    )
    assert [(r.ref, r.source) for r in resources] == [
        ("Service/orders", Source("a.yaml", 1)),
        ("Service/pay", Source("a.yaml", 4)),
        ("Route/orders", Source("b.yaml", 1)),
    ]


# -- problems, each with file, line and field --------------------------------------------------


def test_unknown_spec_field_suggests_the_right_one() -> None:
    text = "kind: Service\nmetadata:\n  name: orders\nspec:\n  timout: 2s\n"
    assert one_problem(text) == (5, "spec.timout", "unknown field; did you mean 'timeout'?")


def test_unknown_spec_field_without_close_match_lists_allowed() -> None:
    text = "kind: Service\nmetadata:\n  name: orders\nspec:\n  zzz: 1\n"
    assert one_problem(text) == (
        5,
        "spec.zzz",
        "unknown field (allowed: balancer, circuitBreaker, healthCheck, maxStreamAge, outlierDetection, "
        "panicThreshold, retryBudget, subsets, timeout, tls)",
    )


@pytest.mark.parametrize(
    ("written", "quoted"),
    [("2", "'2'"), ("1.10", "'1.10'")],
)
def test_label_value_number_says_to_quote_it(written: str, quoted: str) -> None:
    text = f"kind: Service\nmetadata:\n  name: orders\n  labels:\n    version: {written}\n"
    line, path, message = one_problem(text)
    assert (line, path) == (5, "metadata.labels.version")
    assert message.startswith("expected a string, got ")
    # The advice must reproduce what the user wrote, or quoting it changes the value.
    assert message.endswith(f"(quote it in YAML: {quoted})")


def test_subset_label_number_in_spec() -> None:
    text = "kind: Service\nmetadata: {name: orders}\nspec:\n  subsets:\n    v3:\n      version: 3\n"
    assert one_problem(text) == (
        6,
        "spec.subsets.v3.version",
        "expected a string, got 3 (quote it in YAML: '3')",
    )


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("2", "duration 2 needs a unit: write 2s or 2ms"),
        ("2 s", "'2 s' is not a duration: use a number with a unit ms, s, m or h (e.g. 2s, 300ms)"),
        ("-1s", "'-1s' is not a duration: use a number with a unit ms, s, m or h (e.g. 2s, 300ms)"),
        ("0s", "must be greater than 0"),
    ],
)
def test_bad_duration(written: str, message: str) -> None:
    text = f"kind: Service\nmetadata: {{name: orders}}\nspec:\n  subsets: {{}}\n  timeout: {written}\n"
    assert one_problem(text) == (5, "spec.timeout", message)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("Servise", "unknown kind 'Servise'; did you mean 'Service'? (known: Route, Service)"),
        ("service", "unknown kind 'service'; did you mean 'Service'? (known: Route, Service)"),
        ("svc", "unknown kind 'svc'; did you mean 'Service'? (known: Route, Service)"),
        ("Gateway", "unknown kind 'Gateway' (known: Route, Service)"),
    ],
)
def test_unknown_kind(kind: str, message: str) -> None:
    text = f"metadata:\n  name: orders\nkind: {kind}\n"
    assert one_problem(text) == (3, "kind", message)


def test_missing_kind() -> None:
    assert one_problem("metadata: {name: orders}\n") == (1, "kind", "required field is missing")


def test_missing_metadata() -> None:
    text = "# orders\nkind: Service\nspec:\n  timeout: 2s\n"
    assert one_problem(text) == (2, "metadata", "required field is missing (metadata.name)")


def test_missing_metadata_name() -> None:
    text = "kind: Service\nmetadata:\n  labels: {team: pay}\n"
    assert one_problem(text) == (2, "metadata.name", "required field is missing")


@pytest.mark.parametrize("name", ["Orders", "orders_v2", "-orders", "a" * 64])
def test_bad_metadata_name(name: str) -> None:
    text = f"kind: Service\nmetadata:\n  name: {name}\n"
    [problem] = problems_of(("svc.yaml", text))
    assert (problem.line, problem.path, problem.resource) == (3, "metadata.name", f"Service/{name}")
    assert problem.message.startswith(f"{name!r} is not a valid name: use at most 63 lowercase letters")


def test_unknown_top_level_field() -> None:
    text = "kind: Service\nmetadata: {name: orders}\nspecs:\n  timeout: 2s\n"
    assert one_problem(text) == (3, "specs", "unknown field; did you mean 'spec'?")


def test_wrong_api_version() -> None:
    text = "apiVersion: gmesh/v2\nkind: Service\nmetadata: {name: orders}\n"
    assert one_problem(text) == (1, "apiVersion", "must be 'gmesh/v1' (or left out)")


def test_document_not_a_mapping() -> None:
    assert one_problem("- kind: Service\n") == (
        1,
        "",
        "a config document must be a mapping with kind, metadata and spec",
    )


def test_empty_subset_selector_rejected() -> None:
    text = "kind: Service\nmetadata: {name: orders}\nspec:\n  subsets:\n    v1: {version: v1}\n    v2: {}\n"
    line, path, message = one_problem(text)
    assert (line, path) == (4, "spec.subsets")
    assert message.startswith("subset 'v2' selects no labels, so it would match every endpoint")


def test_every_problem_of_a_document_is_reported() -> None:
    text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: Orders\nspec:\n  timeout: 5\n"
    problems = problems_of(("svc.yaml", text))
    assert [(p.line, p.path) for p in problems] == [
        (1, "apiVersion"),
        (4, "metadata.name"),
        (6, "spec.timeout"),
    ]


def test_duplicate_resource_across_files() -> None:
    problems = problems_of(
        ("a.yaml", "kind: Service\nmetadata:\n  name: orders\n"),
        ("b.yaml", "# again\nkind: Service\nmetadata:\n  name: orders\nspec: {timeout: 1s}\n"),
    )
    assert problems == [
        Problem(
            "b.yaml",
            4,
            "metadata.name",
            "duplicate Service/orders (also defined at a.yaml:1)",
            "Service/orders",
        )
    ]


def test_same_name_in_two_kinds_is_no_duplicate() -> None:
    resources = validate(
        ("a.yaml", "kind: Service\nmetadata: {name: orders}\n"),
        ("b.yaml", "kind: Route\nmetadata: {name: orders}\nspec: {service: orders}\n"),
    )
    assert [r.ref for r in resources] == ["Service/orders", "Route/orders"]


def test_config_error_message_lists_problems() -> None:
    with pytest.raises(ConfigError) as error:
        validate(("svc.yaml", "kind: Service\nmetadata: {name: orders}\nspec: {timeout: 2}\n"))
    assert str(error.value) == (
        "1 problem in config, nothing was written\n"
        "  svc.yaml:3: Service/orders: spec.timeout: duration 2 needs a unit: write 2s or 2ms"
    )


# -- cross-resource checks ---------------------------------------------------------------------

ROUTE_TO_PAYMENTS = """\
    kind: Route
    metadata:
      name: r1
    spec:
      weights:
        v1: 1
      service: payments
    """


def test_check_problem_points_at_the_field() -> None:
    problems = problems_of(("route.yaml", ROUTE_TO_PAYMENTS))
    assert problems == [Problem("route.yaml", 7, "spec.service", "no Service 'payments'", "Route/r1")]


def test_check_sees_resources_of_the_same_batch() -> None:
    service = "kind: Service\nmetadata: {name: payments}\nspec:\n  subsets: {v1: {version: v1}}\n"
    resources = validate(("route.yaml", ROUTE_TO_PAYMENTS), ("svc.yaml", service))
    assert [r.ref for r in resources] == ["Route/r1", "Service/payments"]


def test_check_sees_current_resources() -> None:
    service = "kind: Service\nmetadata: {name: payments}\nspec:\n  subsets: {v1: {a: b}}\n"
    [stored] = validate(("svc.yaml", service))
    current = ConfigView({"Service": {"payments": stored}})
    assert [r.ref for r in validate(("route.yaml", ROUTE_TO_PAYMENTS), current=current)] == ["Route/r1"]


def test_checks_do_not_run_when_documents_are_invalid() -> None:
    bad_service = "kind: Service\nmetadata: {name: other}\nspec: {timeout: 2}\n"
    problems = problems_of(("route.yaml", ROUTE_TO_PAYMENTS), ("svc.yaml", bad_service))
    assert [(p.file, p.path) for p in problems] == [("svc.yaml", "spec.timeout")]


@pytest.mark.parametrize("subset", ["canary", "2024"])
def test_check_problem_on_a_mapping_key(subset: str) -> None:
    service = "kind: Service\nmetadata: {name: payments}\nspec:\n  subsets: {v1: {version: v1}}\n"
    route = (
        "kind: Route\nmetadata: {name: r1}\nspec:\n  service: payments\n"
        f"  weights:\n    v1: 1\n    '{subset}': 2\n"
    )
    problems = problems_of(("svc.yaml", service), ("route.yaml", route))
    assert problems == [
        Problem(
            "route.yaml",
            7,
            f"spec.weights.{subset}",
            f"Service 'payments' has no subset {subset!r}",
            "Route/r1",
        )
    ]


# -- what the catalog reads from etcd ----------------------------------------------------------


def test_parse_stored_valid() -> None:
    [written] = validate(("svc.yaml", FULL_SERVICE))
    stored = parse_stored(written.to_json(), KINDS, key="/gmesh/v1/config/Service/orders", revision=42)
    assert stored == written
    assert (stored.revision, stored.source) == (42, None)
    assert stored.document() == written.document()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", r"^/gmesh/v1/config/Service/orders: not JSON: "),
        (b"[1, 2]", r"^a config document must be a mapping with kind, metadata and spec$"),
        (
            b'{"kind": "Service", "metadata": {"name": "orders"}, "spec": {"timeout": "2"}}',
            r"^spec\.timeout: '2' is not a duration",
        ),
        (
            b'{"kind": "Service", "metadata": {"name": "orders"}, "spec": {"subsets": {"v2": {}}}}',
            r"^spec\.subsets: subset 'v2' selects no labels",
        ),
        (b'{"kind": "Nope", "metadata": {"name": "orders"}}', r"^kind: unknown kind 'Nope'"),
        (b'{"kind": "Service", "spec": {}}', r"^metadata: required field is missing"),
    ],
)
def test_parse_stored_invalid(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_stored(raw, KINDS, key="/gmesh/v1/config/Service/orders")
