"""AuthorizationPolicy: what config is refused, how compiled policies decide, and the `Gate` that
applies them (TLS mode, counts, self probes) where calls are received. Pure logic: no network."""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Callable, Mapping
from textwrap import dedent
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from gmesh.config.kinds import ConfigView, KindRegistry, Resource
from gmesh.config.loader import load_text
from gmesh.config.validate import validate_documents
from gmesh.discovery.catalog import MeshSnapshot
from gmesh.errors import CallError, ConfigError, Problem
from gmesh.pluginmanager import Plugins
from gmesh.security import authz
from gmesh.security.authz import (
    ALLOWED,
    AuthorizationPolicySpec,
    Authorizer,
    Authorizers,
    Decision,
    IdentityMatch,
    compile_authorizers,
)
from gmesh.security.enforce import Gate, mode_of, peer_of

FILE = "authz.yaml"
TD = "spiffe://gmesh.local/svc"
WEB = f"{TD}/web"
ORDERS = f"{TD}/orders"
GET = "/orders.v1.Orders/Get"
LIST = "/orders.v1.Orders/List"
DELETE = "/orders.v1.Orders/Delete"
HEALTH = "/grpc.health.v1.Health/Check"


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


def policy_doc(name: str, rules: list[Any], *, action: str = "ALLOW", service: str = "orders") -> str:
    """One AuthorizationPolicy document (JSON is YAML: it goes through the same loader)."""
    spec = {"service": service, "action": action, "rules": rules}
    return json.dumps({"kind": "AuthorizationPolicy", "metadata": {"name": name}, "spec": spec})


def policies(*docs: str) -> dict[str, Resource]:
    return {r.name: r for r in load("\n---\n".join(docs)) if r.kind == authz.KIND}


def authorizer(*docs: str, service: str = "orders") -> Authorizer:
    return compile_authorizers(policies(*docs))[service]


def one_rule(rule: Mapping[str, Any]) -> Authorizer:
    """An authorizer with a single ALLOW policy holding `rule`: `allowed` says whether it holds."""
    return authorizer(policy_doc("only", [dict(rule)]))


# -- decisions ---------------------------------------------------------------------------------


def test_deny_wins_over_a_matching_allow() -> None:
    auth = authorizer(
        policy_doc("allow-web", [{"from": [WEB]}]),
        policy_doc("deny-delete", [{"methods": [DELETE]}], action="DENY"),
    )
    assert auth.decide(WEB, DELETE) == Decision(False, "deny-delete", "DENY policy deny-delete matches")
    assert auth.decide(WEB, GET) == Decision(True, "allow-web", "ALLOW policy allow-web matches")
    assert auth.decide(ORDERS, GET) == Decision(False, "allow-web", "no ALLOW policy matches (allow-web)")


def test_audit_is_reported_but_never_changes_the_outcome() -> None:
    allow = policy_doc("allow-web", [{"from": [WEB]}])
    audit_all = policy_doc("audit-all", [{}], action="AUDIT")
    audit_delete = policy_doc("audit-delete", [{"methods": [DELETE]}], action="AUDIT")
    deny = policy_doc("deny-list", [{"methods": [LIST]}], action="DENY")
    auth = authorizer(allow, audit_all, audit_delete, deny)
    assert auth.decide(WEB, GET) == Decision(
        True, "allow-web", "ALLOW policy allow-web matches", ("audit-all",)
    )
    assert auth.decide(WEB, DELETE) == Decision(
        True, "allow-web", "ALLOW policy allow-web matches", ("audit-all", "audit-delete")
    )
    assert auth.decide(ORDERS, DELETE) == Decision(
        False, "allow-web", "no ALLOW policy matches (allow-web)", ("audit-all", "audit-delete")
    )
    assert auth.decide(WEB, LIST) == Decision(
        False, "deny-list", "DENY policy deny-list matches", ("audit-all",)
    )
    # The same policies without the audits decide every call the same way.
    plain = authorizer(allow, deny)
    for identity, method in [(WEB, GET), (WEB, DELETE), (ORDERS, DELETE), (WEB, LIST), ("", GET)]:
        assert auth.decide(identity, method).allowed == plain.decide(identity, method).allowed
        assert auth.decide(identity, method).policy == plain.decide(identity, method).policy


def test_audit_alone_allows_and_reports() -> None:
    auth = authorizer(policy_doc("audit-delete", [{"methods": [DELETE]}], action="AUDIT"))
    assert not auth.empty
    assert auth.decide(WEB, DELETE) == Decision(True, "", "no policy selects the service", ("audit-delete",))
    assert auth.decide(WEB, GET) is ALLOWED


def test_without_an_allow_policy_whatever_is_not_denied_is_allowed() -> None:
    auth = authorizer(policy_doc("deny-web", [{"from": [WEB]}], action="DENY"))
    assert auth.decide(WEB, GET) == Decision(False, "deny-web", "DENY policy deny-web matches")
    only_deny = Decision(True, "", "no DENY policy matches, and no ALLOW policy selects the service")
    assert auth.decide(ORDERS, GET) == only_deny
    assert auth.decide("", DELETE) == only_deny
    assert Authorizer("orders", ()).decide(ORDERS, GET) is ALLOWED
    assert Decision(True, "", "no policy selects the service", ()) == ALLOWED


def test_once_an_allow_policy_selects_the_service_unmatched_calls_are_denied_naming_them() -> None:
    auth = authorizer(
        policy_doc("b-writers", [{"from": [ORDERS], "methods": [DELETE]}]),
        policy_doc("a-readers", [{"from": [WEB], "methods": [GET]}]),
        policy_doc("other-service", [{}], service="payments"),
    )
    assert [p.name for p in auth.allows] == ["a-readers", "b-writers"]  # by name
    decision = auth.decide(WEB, DELETE)
    assert decision == Decision(
        False, "a-readers, b-writers", "no ALLOW policy matches (a-readers, b-writers)"
    )
    assert auth.denial(decision, WEB, DELETE) == (
        f"gmesh: {WEB} may not call {DELETE} of orders: no ALLOW policy matches (a-readers, b-writers)"
    )
    assert auth.denial(auth.decide("", GET), "", GET) == (
        f"gmesh: a caller without a mesh identity (plaintext) may not call {GET} of orders: "
        "no ALLOW policy matches (a-readers, b-writers)"
    )
    assert auth.decide(WEB, GET) == Decision(True, "a-readers", "ALLOW policy a-readers matches")
    assert auth.decide(ORDERS, DELETE) == Decision(True, "b-writers", "ALLOW policy b-writers matches")


def test_a_policy_for_another_service_selects_only_that_one() -> None:
    compiled = compile_authorizers(policies(policy_doc("pay", [{"from": [WEB]}], service="payments")))
    assert set(compiled) == {"payments"}
    assert Authorizers().for_service(policies(policy_doc("pay", [{}], service="payments")), "orders").empty


# -- identities --------------------------------------------------------------------------------

TEAM = f"{TD}/team-"


@pytest.mark.parametrize(
    ("source", "identity", "holds"),
    [
        (WEB, WEB, True),
        (WEB, f"{WEB}-2", False),
        (WEB, f"{TD}/we", False),
        (WEB, "", False),
        ({"exact": WEB}, WEB, True),
        ({"exact": WEB}, f"{WEB}2", False),
        (f"{TEAM}*", f"{TEAM}a", True),
        (f"{TEAM}*", TEAM, True),  # '*' matches an empty run too
        (f"{TEAM}*", WEB, False),
        (f"{TEAM}*", "spiffe://elsewhere/svc/team-a", False),
        ("spiffe://*/svc/web", "spiffe://other.domain/svc/web", True),
        ("spiffe://*/svc/web", "spiffe://other.domain/svc/web2", False),  # the whole ID must match
        ({"prefix": TEAM}, f"{TEAM}a", True),
        ({"prefix": TEAM}, f"{TD}/team", False),
        ({"prefix": TEAM}, "", False),
        ({"glob": f"{TD}/*"}, WEB, True),
        ({"glob": f"{TD}/*"}, "spiffe://elsewhere/svc/web", False),
        ({"glob": f"{TD}/*"}, "", False),
        ("*", WEB, True),
        ("*", "", True),  # '*' alone: plaintext callers too
        ({"glob": "*"}, "", True),
        ("spiffe://*", WEB, True),
        ("spiffe://*", "", False),  # a SPIFFE glob needs an identity
    ],
)
def test_from_entries_match_identities(source: str | dict[str, str], identity: str, holds: bool) -> None:
    assert one_rule({"from": [source]}).decide(identity, GET).allowed is holds


def test_from_entries_of_one_rule_are_alternatives() -> None:
    auth = one_rule({"from": [WEB, {"prefix": TEAM}, {"glob": "spiffe://partner/*"}]})
    assert [auth.decide(i, GET).allowed for i in (WEB, f"{TEAM}x", "spiffe://partner/svc/a", ORDERS, "")] == [
        True,
        True,
        True,
        False,
        False,
    ]


# -- methods and metadata ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "method", "holds"),
    [
        (GET, GET, True),
        (GET, "/orders.v1.Orders/GetAll", False),
        (GET, "/orders.v1.Orders/Ge", False),
        ("/orders.v1.Orders/Get*", GET, True),
        ("/orders.v1.Orders/Get*", "/orders.v1.Orders/GetAll", True),
        ("/orders.v1.Orders/Get*", LIST, False),
        ("/orders.v1.Orders/*", DELETE, True),
        ("/orders.v1.Orders/*", "/orders.v2.Orders/Get", False),
        ("/orders.v1.Orders/*", "/orders.v1.OrdersAdmin/Get", False),
    ],
)
def test_methods_exact_or_prefix(pattern: str, method: str, holds: bool) -> None:
    assert one_rule({"methods": [pattern]}).decide(WEB, method).allowed is holds


@pytest.mark.parametrize(
    ("match", "metadata", "holds"),
    [
        ({"exact": "acme"}, (("x-tenant", "acme"),), True),
        ({"exact": "acme"}, (("x-tenant", "acme-2"),), False),
        ({"exact": "acme"}, (("x-other", "acme"),), False),
        ({"exact": "acme"}, (), False),
        ({"prefix": "ac"}, (("x-tenant", "acme"),), True),
        ({"prefix": "ac"}, (("x-tenant", "bac"),), False),
        ({"prefix": "ac"}, (), False),
        ({"present": True}, (("x-tenant", ""),), True),
        ({"present": True}, (("x-tenant", "acme"),), True),
        ({"present": True}, (("x-other", "acme"),), False),
        ({"absent": True}, (), True),
        ({"absent": True}, (("x-other", "acme"),), True),
        ({"absent": True}, (("x-tenant", "acme"),), False),
    ],
)
def test_metadata_matches(match: dict[str, Any], metadata: tuple[tuple[str, str], ...], holds: bool) -> None:
    assert one_rule({"metadata": {"x-tenant": match}}).decide(WEB, GET, metadata).allowed is holds


# -- rules -------------------------------------------------------------------------------------


def test_an_empty_rule_matches_every_call() -> None:
    auth = authorizer(policy_doc("everyone", [{}]))
    for identity, method, metadata in [(WEB, GET, ()), ("", DELETE, ()), (ORDERS, "/x.Y/Z", (("a", "b"),))]:
        assert auth.decide(identity, method, metadata) == Decision(
            True, "everyone", "ALLOW policy everyone matches"
        )


def test_rules_are_alternatives_and_fields_of_one_rule_all_hold() -> None:
    auth = one_rule({"from": [WEB], "methods": [GET], "metadata": {"x-tenant": {"exact": "acme"}}})
    tenant = (("x-tenant", "acme"),)
    assert auth.decide(WEB, GET, tenant).allowed
    assert not auth.decide(ORDERS, GET, tenant).allowed  # identity fails
    assert not auth.decide(WEB, LIST, tenant).allowed  # method fails
    assert not auth.decide(WEB, GET, (("x-tenant", "other"),)).allowed  # metadata fails
    assert not auth.decide(WEB, GET).allowed

    either = authorizer(policy_doc("either", [{"from": [WEB], "methods": [GET]}, {"methods": [LIST]}]))
    assert either.decide(WEB, GET).allowed  # first rule
    assert either.decide("", LIST).allowed  # second rule
    assert either.decide(ORDERS, LIST).allowed
    assert not either.decide(ORDERS, GET).allowed  # neither: first rule's identity fails, second's method
    assert not either.decide(WEB, DELETE).allowed


# -- refused config ----------------------------------------------------------------------------


def one_problem(spec: str) -> tuple[int | None, str, str]:
    text = "kind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n" + "".join(
        f"  {line}\n" for line in dedent(spec).splitlines()
    )
    [problem] = problems_of(text)
    assert (problem.file, problem.resource) == (FILE, "AuthorizationPolicy/p")
    return problem.line, problem.path, problem.message


METHOD_HELP = "a path like /orders.v1.Orders/Get, or a prefix ending in '*' (/orders.v1.Orders/*)"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "service: orders\nrules: []",
            (5, "spec.rules", "list should have at least 1 item after validation, not 0"),
        ),
        (
            "service: orders\nrules:\n  - methods: [orders.v1.Orders/Get]",
            (6, "spec.rules[0].methods[0]", f"method 'orders.v1.Orders/Get': {METHOD_HELP}"),
        ),
        (
            "service: orders\nrules:\n  - methods: ['/orders.v1.Orders/*Get']",
            (6, "spec.rules[0].methods[0]", f"method '/orders.v1.Orders/*Get': {METHOD_HELP}"),
        ),
        (
            "service: orders\nrules:\n  - methods: ['/orders.*/Get*']",
            (6, "spec.rules[0].methods[0]", f"method '/orders.*/Get*': {METHOD_HELP}"),
        ),
        (
            "service: orders\nrules:\n  - methods: ['*']",
            (6, "spec.rules[0].methods[0]", f"method '*': {METHOD_HELP}"),
        ),
        (
            "service: orders\nrules:\n  - from: [web]",
            (
                6,
                "spec.rules[0].from",
                "from 'web': a SPIFFE ID (spiffe://<trust-domain>/svc/<service>) or a glob",
            ),
        ),
        (
            "service: orders\naction: REJECT\nrules:\n  - {}",
            (5, "spec.action", "input should be 'ALLOW', 'DENY' or 'AUDIT'"),
        ),
        (
            "service: orders",
            (3, "spec.rules", "required field is missing"),  # the line of `spec:`
        ),
        (
            "service: orders\nrules:\n  - metadata: {X-Tenant: {exact: acme}}",
            (
                6,
                "spec.rules[0].metadata.X-Tenant",
                "key: metadata key 'X-Tenant' must be lowercase letters, digits, '-', '_' or '.'",
            ),
        ),
        (
            "service: orders\nrules:\n  - metadata: {x-tenant: {exact: a, prefix: b}}",
            (
                6,
                "spec.rules[0].metadata.x-tenant",
                "give exactly one of exact, prefix, regex, present, absent (got exact, prefix)",
            ),
        ),
        (
            "service: gmesh-ca\nrules:\n  - {}",
            (4, "spec.service", "the CA authenticates its callers itself (join tokens, certificates)"),
        ),
    ],
)
def test_invalid_policies_are_refused_naming_the_field(spec: str, expected: tuple[int, str, str]) -> None:
    assert one_problem(spec) == expected


def test_an_identity_match_with_two_keys_is_refused() -> None:
    with pytest.raises(
        ValidationError, match=r"give exactly one of exact, prefix, glob \(got exact, prefix\)"
    ):
        IdentityMatch(exact=WEB, prefix=TEAM)
    with pytest.raises(ValidationError, match=r"give exactly one of exact, prefix, glob \(got none\)"):
        IdentityMatch()
    problems = problems_of(
        "kind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  service: orders\n  rules:\n"
        "    - from: [{exact: 'spiffe://a/svc/b', prefix: 'spiffe://a/'}]\n"
    )
    assert "give exactly one of exact, prefix, glob (got exact, prefix)" in [p.message for p in problems]
    assert all(p.path.startswith("spec.rules[0].from[0]") and p.line == 6 for p in problems)


def test_an_identity_match_with_two_keys_is_one_problem_at_the_entry() -> None:
    problems = problems_of(
        "kind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  service: orders\n  rules:\n"
        "    - from: [{exact: 'spiffe://a/svc/b', prefix: 'spiffe://a/'}]\n"
    )
    assert [(p.path, p.message) for p in problems] == [
        ("spec.rules[0].from[0]", "give exactly one of exact, prefix, glob (got exact, prefix)")
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"service": "orders", "rules": []}, "rules\n  List should have at least 1 item"),
        ({"service": "orders", "rules": [{"methods": ["Get"]}]}, "method 'Get': a path like"),
        ({"service": "orders", "rules": [{"methods": ["/a/*/b"]}]}, "method '/a/*/b': a path like"),
        ({"service": "orders", "rules": [{"from": ["orders"]}]}, "from 'orders': a SPIFFE ID"),
        ({"service": "orders", "action": "allow", "rules": [{}]}, "action\n  Input should be 'ALLOW'"),
    ],
)
def test_the_spec_model_refuses_the_same(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as error:
        AuthorizationPolicySpec.model_validate(raw)
    assert message in str(error.value)


def test_a_valid_policy_round_trips() -> None:
    [resource] = load(
        """\
        kind: AuthorizationPolicy
        metadata: {name: orders-readers}
        spec:
          service: orders
          rules:
            - from: ["spiffe://gmesh.local/svc/web", {prefix: "spiffe://gmesh.local/svc/team-"}]
              methods: ["/orders.v1.Orders/Get*"]
              metadata: {x-tenant: {exact: acme}}
        """
    )
    spec = resource.spec
    assert isinstance(spec, AuthorizationPolicySpec)
    assert spec.action == "ALLOW"  # the default
    assert resource.document()["spec"] == {
        "service": "orders",
        "rules": [
            {
                "from": [{"exact": WEB}, {"prefix": TEAM}],  # strings are stored as what they mean
                "methods": ["/orders.v1.Orders/Get*"],
                "metadata": {"x-tenant": {"exact": "acme"}},
            }
        ],
    }
    assert kinds().require("authz").summary is not None
    assert kinds().require("authz").summary(spec) == "ALLOW orders (1 rule)"  # type: ignore[misc]


# -- compiled once per config change -----------------------------------------------------------


def test_authorizers_recompile_only_when_the_resources_object_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = authz.compile_authorizers

    def counting(resources: Mapping[str, Resource]) -> dict[str, Authorizer]:
        calls.append(len(resources))
        return real(resources)

    monkeypatch.setattr(authz, "compile_authorizers", counting)
    authorizers = Authorizers()
    first = policies(policy_doc("allow-web", [{"from": [WEB]}]))
    a = authorizers.for_service(first, "orders")
    assert authorizers.for_service(first, "orders") is a
    assert calls == [1]
    # An equal mapping, but a new object: compiled again.
    again = dict(first)
    b = authorizers.for_service(again, "orders")
    assert b is not a
    assert authorizers.for_service(again, "orders") is b
    assert calls == [1, 1]
    # A service no policy selects gets an empty authorizer, kept too.
    empty = authorizers.for_service(again, "payments")
    assert empty.empty
    assert authorizers.for_service(again, "payments") is empty
    assert calls == [1, 1]
    # No policies at all.
    none = authorizers.for_service(None, "orders")
    assert none.empty
    assert none.decide(WEB, GET) is ALLOWED
    assert calls == [1, 1, 0]


# -- the gate ----------------------------------------------------------------------------------


class FakeContext:
    """What `Gate` reads of a grpc server context."""

    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def mtls(identity: str) -> FakeContext:
    return FakeContext({"peer_spiffe_id": [identity.encode()], "transport_security_type": [b"ssl"]})


PLAIN = FakeContext({})


def snapshot_of(resources: list[Resource]) -> MeshSnapshot:
    by_kind: dict[str, dict[str, Resource]] = collections.defaultdict(dict)
    for resource in resources:
        by_kind[resource.kind][resource.name] = resource
    return MeshSnapshot(resources=dict(by_kind))


def service_doc(mode: str) -> str:
    return json.dumps({"kind": "Service", "metadata": {"name": "orders"}, "spec": {"tls": {"mode": mode}}})


def gate_of(*docs: str, own_identity: str = "") -> Gate:
    snapshot = snapshot_of(load("\n---\n".join(docs))) if docs else MeshSnapshot()
    return Gate("orders", lambda: snapshot, own_identity=own_identity)


def refused(admit: Callable[[], object]) -> CallError:
    with pytest.raises(CallError) as error:
        admit()
    return error.value


def test_peer_of_reads_the_auth_context() -> None:
    assert peer_of(mtls(WEB)) == (WEB, True)
    assert peer_of(PLAIN) == ("", False)
    assert peer_of(FakeContext({"transport_security_type": [b"ssl"]})) == ("", True)
    assert peer_of(FakeContext({"transport_security_type": [b"insecure"]})) == ("", False)


def test_strict_refuses_plaintext_as_unauthenticated() -> None:
    gate = gate_of(service_doc("STRICT"))
    error = refused(lambda: gate.admit(PLAIN, GET, ()))
    assert error.status == grpc.StatusCode.UNAUTHENTICATED
    assert error.details == (
        "gmesh: orders accepts only mutual TLS (tls.mode STRICT); this call was plaintext"
    )
    assert gate.admit(mtls(WEB), GET, ()) == WEB
    assert gate.counts == {("plaintext", "refused", ""): 1, ("mtls", "allowed", ""): 1}
    assert gate.describe() == {
        "service": "orders",
        "tlsMode": "STRICT",
        "calls": [
            {"transport": "mtls", "result": "allowed", "policy": "", "count": 1},
            {"transport": "plaintext", "result": "refused", "policy": "", "count": 1},
        ],
    }


def test_strict_refuses_plaintext_before_policies_are_consulted() -> None:
    gate = gate_of(service_doc("STRICT"), policy_doc("everyone", [{"from": ["*"]}]))
    assert refused(lambda: gate.admit(PLAIN, GET, ())).status == grpc.StatusCode.UNAUTHENTICATED
    assert gate.counts == {("plaintext", "refused", ""): 1}


@pytest.mark.parametrize("docs", [(service_doc("PERMISSIVE"),), ()], ids=["permissive", "no-service"])
def test_permissive_admits_plaintext_and_mtls(docs: tuple[str, ...]) -> None:
    gate = gate_of(*docs)
    assert mode_of(gate._snapshot(), "orders") == "PERMISSIVE"
    assert gate.admit(PLAIN, GET, ()) == ""
    assert gate.admit(PLAIN, GET, ()) == ""
    assert gate.admit(mtls(WEB), GET, ()) == WEB
    assert gate.counts == {("plaintext", "allowed", ""): 2, ("mtls", "allowed", ""): 1}


def test_counts_are_keyed_by_transport_result_and_policy() -> None:
    gate = gate_of(
        service_doc("PERMISSIVE"),
        policy_doc("allow-web", [{"from": [WEB]}]),
        policy_doc("allow-plain-health", [{"from": ["*"], "methods": ["/grpc.health.v1.Health/*"]}]),
        policy_doc("deny-delete", [{"methods": [DELETE]}], action="DENY"),
        policy_doc("audit-list", [{"methods": [LIST]}], action="AUDIT"),
    )
    assert gate.admit(mtls(WEB), GET, ()) == WEB
    assert gate.admit(mtls(WEB), GET, ()) == WEB
    assert gate.admit(mtls(WEB), LIST, ()) == WEB
    assert gate.admit(PLAIN, HEALTH, ()) == ""
    denied = refused(lambda: gate.admit(mtls(WEB), DELETE, ()))
    assert denied.status == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details == f"gmesh: {WEB} may not call {DELETE} of orders: DENY policy deny-delete matches"
    denied = refused(lambda: gate.admit(PLAIN, LIST, ()))
    assert denied.status == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details == (
        f"gmesh: a caller without a mesh identity (plaintext) may not call {LIST} of orders: "
        "no ALLOW policy matches (allow-plain-health, allow-web)"
    )
    assert gate.counts == {
        ("mtls", "allowed", "allow-web"): 3,
        ("mtls", "audited", "audit-list"): 1,
        ("plaintext", "allowed", "allow-plain-health"): 1,
        ("mtls", "denied", "deny-delete"): 1,
        ("plaintext", "audited", "audit-list"): 1,
        ("plaintext", "denied", "allow-plain-health, allow-web"): 1,
    }


def test_own_identity_may_probe_itself_but_nothing_else() -> None:
    gate = gate_of(policy_doc("allow-web", [{"from": [WEB]}]), own_identity=ORDERS)
    assert gate.admit(mtls(ORDERS), HEALTH, ()) == ORDERS
    assert gate.admit(mtls(ORDERS), "/grpc.health.v1.Health/Watch", ()) == ORDERS
    assert gate.admit(mtls(ORDERS), "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", ()) == ORDERS
    own_other = refused(lambda: gate.admit(mtls(ORDERS), GET, ()))
    assert own_other.status == grpc.StatusCode.PERMISSION_DENIED
    assert (
        own_other.details
        == f"gmesh: {ORDERS} may not call {GET} of orders: no ALLOW policy matches (allow-web)"
    )
    # Someone else's health probe is decided by the policies.
    other = refused(lambda: gate.admit(mtls(f"{TD}/payments"), HEALTH, ()))
    assert other.status == grpc.StatusCode.PERMISSION_DENIED
    assert gate.counts == {
        ("mtls", "allowed", ""): 3,
        ("mtls", "denied", "allow-web"): 2,
    }


def test_no_own_identity_means_no_plaintext_self_probe() -> None:
    gate = gate_of(policy_doc("allow-web", [{"from": [WEB]}]))  # own_identity ""
    assert refused(lambda: gate.admit(PLAIN, HEALTH, ())).status == grpc.StatusCode.PERMISSION_DENIED
    assert gate.counts == {("plaintext", "denied", "allow-web"): 1}


def test_the_gate_follows_the_current_snapshot() -> None:
    first = snapshot_of(load(policy_doc("allow-web", [{"from": [WEB]}])))
    second = snapshot_of(
        load(service_doc("STRICT") + "\n---\n" + policy_doc("allow-orders", [{"from": [ORDERS]}]))
    )
    current = [first]
    gate = Gate("orders", lambda: current[0])
    assert gate.admit(mtls(WEB), GET, ()) == WEB
    assert refused(lambda: gate.admit(PLAIN, GET, ())).status == grpc.StatusCode.PERMISSION_DENIED
    current[0] = second
    assert refused(lambda: gate.admit(mtls(WEB), GET, ())).details.endswith(
        "no ALLOW policy matches (allow-orders)"
    )
    assert gate.admit(mtls(ORDERS), GET, ()) == ORDERS
    assert refused(lambda: gate.admit(PLAIN, GET, ())).status == grpc.StatusCode.UNAUTHENTICATED
    assert gate.describe()["tlsMode"] == "STRICT"


def test_a_metadata_key_sent_twice_cannot_slip_past_a_policy() -> None:
    """DENY holds when any value matches; ALLOW only when every value does."""
    deny = authorizer(
        policy_doc("no-evil", [{"metadata": {"x-tenant": {"exact": "evil"}}}], action="DENY"),
        policy_doc("tenants", [{"metadata": {"x-tenant": {"prefix": "ok"}}}]),
    )
    twice = (("x-tenant", "ok"), ("x-tenant", "evil"))
    assert deny.decide(WEB, GET, twice).policy == "no-evil" and not deny.decide(WEB, GET, twice).allowed
    assert deny.decide(WEB, GET, (("x-tenant", "ok-1"), ("x-tenant", "ok-2"))).allowed
    allow = authorizer(policy_doc("tenants", [{"metadata": {"x-tenant": {"prefix": "ok"}}}]))
    assert not allow.decide(WEB, GET, (("x-tenant", "ok"), ("x-tenant", "other"))).allowed
    assert not allow.decide(WEB, GET, ()).allowed  # absent: a prefix does not hold
    absent = authorizer(policy_doc("no-debug", [{"metadata": {"x-debug": {"present": True}}}], action="DENY"))
    assert not absent.decide(WEB, GET, (("x-debug", "1"),)).allowed and absent.decide(WEB, GET, ()).allowed


@pytest.mark.parametrize("field", ["from", "methods"])
def test_an_empty_list_is_refused_instead_of_never_matching(field: str) -> None:
    problems = problems_of(policy_doc("p", [{field: []}]))
    assert [p.path for p in problems] == [f"spec.rules[0].{field}"]
    assert "at least 1 item" in problems[0].message


def test_received_calls_are_in_the_prometheus_exposition() -> None:
    """gmesh_received_calls_total, parsed from the text the proxy's /metrics serves."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gmesh.metrics import process_registry

    snapshot = snapshot_of(load(policy_doc("web-only", [{"from": [WEB]}], service="exposed")))
    gate = Gate("exposed", lambda: snapshot)
    for _ in range(3):
        gate.admit(mtls(WEB), GET, ())
    refused(lambda: gate.admit(mtls(ORDERS), GET, ()))
    refused(lambda: gate.admit(PLAIN, GET, ()))
    text = generate_latest(process_registry()).decode()
    samples = {
        (s.labels["transport"], s.labels["result"], s.labels["policy"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "gmesh_received_calls"
        for s in family.samples
        if s.name == "gmesh_received_calls_total" and s.labels["service"] == "exposed"
    }
    assert samples == {
        ("mtls", "allowed", "web-only"): 3.0,
        ("mtls", "denied", "web-only"): 1.0,
        ("plaintext", "denied", "web-only"): 1.0,
    }
