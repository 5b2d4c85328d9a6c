"""The Route kind: what config is refused (with file, line and field), and how compiled rules behave."""

from __future__ import annotations

import collections
import functools
from textwrap import dedent

import grpc
import pytest

from gmesh.chain.call import Call, Caller
from gmesh.config.kinds import ConfigView, KindRegistry, Resource, Source
from gmesh.config.loader import load_text
from gmesh.config.validate import validate_documents
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.errors import ConfigError, Problem
from gmesh.pluginmanager import Plugins
from gmesh.routing.spec import RouteSpec
from gmesh.routing.table import CompiledFault, CompiledRetry, CompiledRule, RouteTable, compile_table

FILE = "route.yaml"


@functools.cache
def kinds() -> KindRegistry:
    return Plugins.builtin_only().config_kinds()


def load(text: str) -> list[Resource]:
    """Resources from YAML text, validated as `gmesh apply` does (every built-in kind known)."""
    docs, problems = load_text(dedent(text), FILE)
    assert problems == []
    return validate_documents(docs, kinds(), ConfigView({}))


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as error:
        load(text)
    return error.value.problems


def one_problem(text: str) -> tuple[int | None, str, str]:
    [problem] = problems_of(text)
    assert problem.file == FILE
    return problem.line, problem.path, problem.message


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line of `text` (dedented) containing `needle`."""
    found = [i for i, line in enumerate(dedent(text).splitlines(), 1) if needle in line]
    assert len(found) == 1, f"{needle!r} is on lines {found}"
    return found[0]


SERVICE = dedent(
    """\
    kind: Service
    metadata: {name: orders}
    spec:
      subsets: {v1: {version: v1}, v2: {version: v2}}
    ---
    """
)

ROUTE = SERVICE + dedent(
    """\
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
          mirror: {backend: {subset: v2}, percent: 5}
          fault: {abort: {percent: 10, code: UNAVAILABLE}, delay: {percent: 5, duration: 100ms}}
          requestMetadata: {add: {x-routed: "yes"}, remove: [x-debug]}
    """
)

#: A Service with subset v1 only, and the head of a Route for it, for the rules under test.
V1_ONLY_HEAD = dedent(
    """\
    kind: Service
    metadata: {name: orders}
    spec:
      subsets: {v1: {version: v1}}
    ---
    kind: Route
    metadata: {name: orders}
    spec:
      service: orders
      rules:
    """
)


def route(rules: str) -> str:
    """V1_ONLY_HEAD followed by `rules` (indented as items of `spec.rules`)."""
    return V1_ONLY_HEAD + "".join(f"    {line}\n" for line in dedent(rules).splitlines())


# -- valid config ------------------------------------------------------------------------------


def test_valid_route_loads() -> None:
    service, resource = load(ROUTE)
    assert (service.ref, resource.ref) == ("Service/orders", "Route/orders")
    assert resource.source == Source(FILE, line_of(ROUTE, "kind: Route"))
    spec = resource.spec
    assert isinstance(spec, RouteSpec)
    assert spec.service == "orders"
    assert [r.name for r in spec.rules] == ["beta-users", "default"]
    beta, default = spec.rules
    assert beta.match is not None and beta.match.method is not None
    assert beta.match.method.prefix == "/orders.v1.Orders/"
    assert beta.match.metadata["x-tier"].exact == "beta"
    assert [(b.subset, b.weight) for b in default.backends] == [("v1", 90), ("v2", 10)]
    assert default.sticky_key == "x-user-id"
    assert default.timeout == 1.0
    assert default.retry is not None
    assert (default.retry.attempts, default.retry.on, default.retry.per_try_timeout) == (
        3,
        ["UNAVAILABLE"],
        0.3,
    )
    assert default.mirror is not None and default.mirror.backend.subset == "v2"
    assert default.fault is not None and default.fault.delay is not None
    assert default.fault.delay.duration == 0.1


def test_valid_route_document_round_trips() -> None:
    resources = load(ROUTE)
    docs, _ = load_text(dedent(ROUTE), FILE)
    assert [r.document() for r in resources] == [d.data for d in docs]


def test_rule_without_backends_goes_to_every_endpoint() -> None:
    [_, resource] = load(route("- name: all"))
    [rule] = resource.spec.rules  # type: ignore[attr-defined]
    assert [(b.service, b.subset, b.weight) for b in rule.backends] == [(None, None, 100)]


# -- refused config, each at its line and field ------------------------------------------------


def test_weights_not_summing_to_100() -> None:
    text = route(
        """\
        - name: split
          backends:
            - {subset: v1, weight: 90}
            - {weight: 5}
        """
    )
    line, path, message = one_problem(text)
    assert path.endswith(".backends")
    assert path == "spec.rules[0].backends"
    assert line == line_of(text, "backends:")
    assert "95" in message and "100" in message


def test_weights_over_100_in_a_later_rule() -> None:
    text = route(
        """\
        - name: first
          match: {method: {prefix: /a.B/}}
        - name: second
          backends: [{subset: v1, weight: 60}, {weight: 60}]
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "weight: 60"), "spec.rules[1].backends")
    assert "120" in message


def test_unknown_subset_names_the_known_ones() -> None:
    text = route(
        """\
        - name: canary
          backends:
            - {subset: v1, weight: 50}
            - {subset: v2, weight: 50}
        """
    )
    [problem] = problems_of(text)
    assert problem.resource == "Route/orders"
    assert (problem.line, problem.path) == (line_of(text, "subset: v2"), "spec.rules[0].backends[1].subset")
    assert "'v2'" in problem.message and "v1" in problem.message


def test_unknown_subset_in_first_backend() -> None:
    text = route(
        """\
        - name: canary
          backends: [{subset: v2}]
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "subset: v2"), "spec.rules[0].backends[0].subset")
    assert "v2" in message and "Service/orders defines v1" in message


def test_unknown_subset_of_the_mirror() -> None:
    text = route(
        """\
        - name: shadow
          mirror:
            backend: {subset: v3}
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "subset: v3"), "spec.rules[0].mirror.backend.subset")
    assert "v3" in message and "v1" in message


def test_subset_of_a_service_without_a_service_resource() -> None:
    text = route(
        """\
        - name: elsewhere
          backends: [{service: payments, subset: v1}]
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "service: payments"), "spec.rules[0].backends[0].subset")
    assert "Service/payments" in message


@pytest.mark.parametrize(
    ("rule", "needle", "field"),
    [
        (
            "- name: r\n  match:\n    method: {regex: '/orders(/'}\n",
            "regex:",
            "spec.rules[0].match.method.regex",
        ),
        (
            "- name: r\n  match:\n    metadata:\n      x-tier: {regex: '[beta'}\n",
            "regex:",
            "spec.rules[0].match.metadata.x-tier.regex",
        ),
    ],
)
def test_invalid_regex(rule: str, needle: str, field: str) -> None:
    text = route(rule)
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, needle), field)
    assert message.startswith("invalid regex ")


def test_unknown_status_code_in_retry_on() -> None:
    text = route(
        """\
        - name: r
          retry:
            attempts: 2
            on: [UNAVAILABLE, UNAVAIABLE]
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "on: ["), "spec.rules[0].retry.on")
    assert "'UNAVAIABLE'" in message
    assert "UNAVAILABLE" in message.split("one of:")[1]  # lists the real names


def test_ok_is_refused_in_retry_on() -> None:
    text = route("- name: r\n  retry: {on: [OK]}\n")
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "retry:"), "spec.rules[0].retry.on")
    assert "not a failure" in message


def test_ok_in_retry_on_message_keeps_the_code_name() -> None:
    _, _, message = one_problem(route("- name: r\n  retry: {on: [OK]}\n"))
    assert message == "OK is not a failure to retry on"


def test_unknown_status_code_in_fault_abort() -> None:
    text = route(
        """\
        - name: r
          fault:
            abort:
              percent: 10
              code: UNAVAILIBLE
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "code:"), "spec.rules[0].fault.abort.code")
    assert "'UNAVAILIBLE'" in message


def test_ok_is_refused_as_abort_code() -> None:
    text = route("- name: r\n  fault:\n    abort: {percent: 10, code: OK}\n")
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "abort:"), "spec.rules[0].fault.abort.code")
    assert "OK" in message


def test_duplicate_rule_names() -> None:
    text = route(
        """\
        - name: same
          match: {method: {prefix: /a.B/}}
        - name: same
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "rules:"), "spec.rules")
    assert "'same'" in message and "unique" in message


@pytest.mark.parametrize("catch_all", ["- name: everything\n", "- name: everything\n  match: {}\n"])
def test_rule_after_a_catch_all_rule(catch_all: str) -> None:
    text = route(catch_all + "- name: never\n  match: {method: {exact: /a.B/C}}\n")
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "rules:"), "spec.rules")
    assert "'never'" in message and "'everything'" in message


def test_catch_all_last_is_fine() -> None:
    text = route("- name: some\n  match: {method: {exact: /a.B/C}}\n- name: rest\n")
    [_, resource] = load(text)
    assert [r.name for r in resource.spec.rules] == ["some", "rest"]  # type: ignore[attr-defined]


def test_two_routes_for_the_same_service() -> None:
    text = route("- name: a\n") + dedent(
        """\
    ---
    kind: Route
    metadata: {name: orders-too}
    spec:
      service: orders
      rules: [{name: b}]
    """
    )
    problems = problems_of(text)
    service_lines = [i for i, line in enumerate(dedent(text).splitlines(), 1) if "service: orders" in line]
    assert sorted((p.resource, p.line, p.path) for p in problems) == [
        ("Route/orders", service_lines[0], "spec.service"),
        ("Route/orders-too", service_lines[1], "spec.service"),
    ]
    by_resource = {p.resource: p.message for p in problems}
    assert by_resource["Route/orders"].startswith("Route/orders-too already routes service 'orders'")
    assert by_resource["Route/orders-too"].startswith("Route/orders already routes service 'orders'")


def test_present_false_is_refused() -> None:
    text = route(
        """\
        - name: r
          match:
            metadata:
              x-debug: {present: false}
        """
    )
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "x-debug:"), "spec.rules[0].match.metadata.x-debug")
    assert "absent: true" in message


def test_misspelt_rule_field_suggests_the_right_one() -> None:
    text = route("- name: r\n  stikyKey: x-user-id\n")
    line, path, message = one_problem(text)
    assert (line, path) == (line_of(text, "stikyKey"), "spec.rules[0].stikyKey")
    assert message == "unknown field; did you mean 'stickyKey'?"


# -- compiled rules ----------------------------------------------------------------------------


async def _forward(call: Call) -> None:
    return None


def call(
    method: str = "/orders.v1.Orders/Get", *metadata: tuple[str, str | bytes], caller: Caller | None = None
) -> Call:
    if caller is None:
        return Call(method, tuple(metadata), None, "orders", forward=_forward)
    return Call(method, tuple(metadata), None, "orders", forward=_forward, caller=caller)


def snapshot_of(resources: list[Resource]) -> MeshSnapshot:
    by_kind: dict[str, dict[str, Resource]] = collections.defaultdict(dict)
    for resource in resources:
        by_kind[resource.kind][resource.name] = resource
    return MeshSnapshot(resources=dict(by_kind))


def table_of(text: str, service: str = "orders") -> RouteTable:
    table = compile_table(service, snapshot_of(load(text)))
    assert table is not None
    return table


@pytest.fixture
def table() -> RouteTable:
    return table_of(ROUTE)


def rule_named(table: RouteTable, name: str) -> CompiledRule:
    [rule] = [r for r in table.rules if r.name == name]
    return rule


def test_compile_table_keeps_rule_order(table: RouteTable) -> None:
    assert (table.service, table.route) == ("orders", "orders")
    assert [(r.index, r.name) for r in table.rules] == [(0, "beta-users"), (1, "default")]


def test_no_route_no_table() -> None:
    snapshot = snapshot_of(load(ROUTE))
    assert compile_table("payments", snapshot) is None
    assert compile_table("orders", MeshSnapshot()) is None


def test_header_rule_matches_beta_tier(table: RouteTable) -> None:
    rule = table.match(call("/orders.v1.Orders/Get", ("x-tier", "beta")))
    assert rule is not None and rule.name == "beta-users"


@pytest.mark.parametrize(
    ("method", "metadata"),
    [
        ("/orders.v1.Orders/Get", ()),
        ("/orders.v1.Orders/Get", (("x-tier", "gold"),)),
        ("/orders.v1.Orders/Get", (("x-tier", "Beta"),)),
        ("/orders.v2.Orders/Get", (("x-tier", "beta"),)),  # right tier, wrong method
        ("/orders.v1.Orders/Get", (("x-other", "beta"),)),
    ],
)
def test_other_calls_get_the_default(
    table: RouteTable, method: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    rule = table.match(call(method, *metadata))
    assert rule is not None and rule.name == "default"


def test_first_value_of_a_repeated_key_decides(table: RouteTable) -> None:
    first_beta = table.match(call("/orders.v1.Orders/Get", ("x-tier", "beta"), ("x-tier", "gold")))
    first_gold = table.match(call("/orders.v1.Orders/Get", ("x-tier", "gold"), ("x-tier", "beta")))
    assert (first_beta and first_beta.name, first_gold and first_gold.name) == ("beta-users", "default")


def test_explain_reports_the_failed_condition(table: RouteTable) -> None:
    explained = table.explain(call("/orders.v1.Orders/Get", ("x-tier", "gold")))
    assert [(rule.name, failed) for rule, failed in explained] == [
        ("beta-users", "metadata x-tier exact 'beta'"),
        ("default", None),
    ]


def test_explain_reports_the_first_failed_condition(table: RouteTable) -> None:
    explained = table.explain(call("/payments.v1.Pay/Charge"))
    assert [(rule.name, failed) for rule, failed in explained] == [
        ("beta-users", "method prefix '/orders.v1.Orders/'"),
        ("default", None),
    ]


def test_explain_stops_at_the_match(table: RouteTable) -> None:
    explained = table.explain(call("/orders.v1.Orders/Get", ("x-tier", "beta")))
    assert [(rule.name, failed) for rule, failed in explained] == [("beta-users", None)]


ORDERED_RULES = {
    "get-or-list": (
        "- name: get-or-list\n  match: {method: {regex: '/orders\\.v1\\.Orders/(Get|List)Order'}}\n"
    ),
    "any-orders": (
        "- name: any-orders\n  match: {method: {prefix: /orders.v1.Orders/}}\n  backends: [{subset: v1}]\n"
    ),
    "canary": "- name: canary\n  match: {metadata: {x-canary: {present: true}}}\n",
}


def ordered(*names: str) -> RouteTable:
    return table_of(route("".join(ORDERED_RULES[n] for n in names)))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("/orders.v1.Orders/GetOrder", "get-or-list"),
        ("/orders.v1.Orders/ListOrder", "get-or-list"),
        ("/orders.v1.Orders/GetOrderX", "any-orders"),  # the regex must match the whole method
        ("/orders.v1.Orders/DeleteOrder", "any-orders"),
        ("/ordersXv1.Orders/GetOrder", None),
    ],
)
def test_regex_method_match_and_first_match_wins(method: str, expected: str | None) -> None:
    rule = ordered("get-or-list", "any-orders").match(call(method))
    assert (rule.name if rule else None) == expected


def test_rule_order_not_specificity_decides() -> None:
    get_order = call("/orders.v1.Orders/GetOrder", ("x-canary", "1"))
    for names in [
        ("get-or-list", "any-orders", "canary"),
        ("any-orders", "get-or-list", "canary"),
        ("canary", "get-or-list", "any-orders"),
    ]:
        rule = ordered(*names).match(get_order)
        assert rule is not None and rule.name == names[0], names


def test_no_rule_matches_without_a_catch_all() -> None:
    table = ordered("get-or-list", "any-orders", "canary")
    lone = call("/payments.v1.Pay/Charge")
    assert table.match(lone) is None
    assert [(r.name, failed) for r, failed in table.explain(lone)] == [
        ("get-or-list", "method regex '/orders\\\\.v1\\\\.Orders/(Get|List)Order'"),
        ("any-orders", "method prefix '/orders.v1.Orders/'"),
        ("canary", "metadata x-canary present"),
    ]


def test_authority_and_caller_conditions() -> None:
    table = table_of(
        route(
            """\
            - name: from-web
              match:
                metadata: {':authority': {exact: orders}}
                caller: {labels: {app: web}, identity: {prefix: 'spiffe://mesh/'}}
            """
        )
    )
    web = Caller(identity="spiffe://mesh/web", labels={"app": "web", "zone": "a"})
    assert table.match(call("/a.B/C", caller=web)) is not None
    not_web = Caller(identity="spiffe://mesh/web", labels={"app": "cli"})
    assert [f for _, f in table.explain(call("/a.B/C", caller=not_web))] == ["caller label app=web"]
    anonymous = Caller(labels={"app": "web"})
    assert [f for _, f in table.explain(call("/a.B/C", caller=anonymous))] == [
        "caller identity prefix 'spiffe://mesh/'"
    ]


def test_choose_is_sticky_per_user(table: RouteTable) -> None:
    rule = rule_named(table, "default")
    for user in ("u-1", "u-2", "u-3", "alice", "bob"):
        chosen = {rule.choose(call("/orders.v1.Orders/Get", ("x-user-id", user))) for _ in range(50)}
        assert len(chosen) == 1, user
        assert chosen <= {("orders", "v1"), ("orders", "v2")}


def test_choose_spreads_users_by_weight(table: RouteTable) -> None:
    rule = rule_named(table, "default")
    per_user = collections.Counter(
        rule.choose(call("/orders.v1.Orders/Get", ("x-user-id", f"user-{i}"))) for i in range(10_000)
    )
    assert set(per_user) == {("orders", "v1"), ("orders", "v2")}
    assert 8800 <= per_user["orders", "v1"] <= 9200, per_user


def test_choose_without_the_sticky_key_follows_the_weights_exactly(table: RouteTable) -> None:
    rule = rule_named(table, "default")
    chosen = collections.Counter(rule.choose(call("/orders.v1.Orders/Get")) for _ in range(1000))
    assert chosen == {("orders", "v1"): 900, ("orders", "v2"): 100}


def test_single_backend_rule(table: RouteTable) -> None:
    rule = rule_named(table, "beta-users")
    assert rule.split.single == ("orders", "v2")
    assert {rule.choose(call("/orders.v1.Orders/Get", ("x-user-id", f"u{i}"))) for i in range(100)} == {
        ("orders", "v2")
    }


def test_backend_keys_name_service_and_subset() -> None:
    text = dedent(
        """\
    kind: Service
    metadata: {name: payments}
    spec:
      subsets: {v1: {version: v1}}
    ---
    """
    ) + route("- name: r\n  backends: [{weight: 50}, {service: payments, subset: v1, weight: 50}]\n")
    [rule] = table_of(text).rules
    assert rule.split.choices == (("orders", None), ("payments", "v1"))


def test_edit_adds_and_removes_metadata(table: RouteTable) -> None:
    rule = rule_named(table, "default")
    edited = rule.edit((("x-debug", "1"), ("x-user-id", "u-1"), ("x-routed", "no"), ("x-debug", "2")))
    assert edited == (("x-user-id", "u-1"), ("x-routed", "yes"))
    assert rule.edit(()) == (("x-routed", "yes"),)


def test_rule_without_edits_leaves_metadata_alone(table: RouteTable) -> None:
    rule = rule_named(table, "beta-users")
    metadata = (("x-debug", "1"), ("x-tier", "beta"))
    assert not rule.remove and not rule.add
    assert rule.edit(metadata) == metadata


def test_policies_are_compiled(table: RouteTable) -> None:
    rule = rule_named(table, "default")
    assert rule.sticky_key == "x-user-id"
    assert rule.timeout == 1.0
    assert rule.retry == CompiledRetry(3, frozenset({grpc.StatusCode.UNAVAILABLE}), 0.3, 0.025, 0.25)
    assert (rule.mirror, rule.mirror_share) == (("orders", "v2"), pytest.approx(0.05))
    assert rule.fault == CompiledFault(
        pytest.approx(0.1),  # type: ignore[arg-type]
        grpc.StatusCode.UNAVAILABLE,
        pytest.approx(0.05),  # type: ignore[arg-type]
        pytest.approx(0.1),  # type: ignore[arg-type]
    )
    beta = rule_named(table, "beta-users")
    assert (beta.timeout, beta.retry, beta.mirror, beta.fault, beta.sticky_key) == (
        None,
        None,
        None,
        None,
        None,
    )
