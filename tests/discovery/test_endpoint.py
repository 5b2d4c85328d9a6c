"""Endpoint records and the syntax rules for addresses, labels and names."""

import json
import re
from types import MappingProxyType

import pytest

from gmesh.discovery.endpoint import (
    Endpoint,
    MethodKind,
    check_grpc_service,
    check_labels,
    check_service_name,
    dns_label_problem,
    frozen_labels,
    parse_address,
    parse_label,
)
from gmesh.errors import InvalidArgument


def _one_line_naming(error: pytest.ExceptionInfo[InvalidArgument], text: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert repr(text) in message
    return message


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("10.1.2.3:1", ("10.1.2.3", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("orders.svc.cluster.local:8080", ("orders.svc.cluster.local", 8080)),
        ("My-Host:80", ("My-Host", 80)),
        ("[::1]:50051", ("[::1]", 50051)),
        ("[2001:db8::1]:443", ("[2001:db8::1]", 443)),
    ],
)
def test_parse_address_valid(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["localhost", "10.0.0.1", "[::1]"])
def test_parse_address_missing_port(address: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_address(address)
    assert "has no port: expected HOST:PORT" in _one_line_naming(error, address)


@pytest.mark.parametrize(
    "address",
    ["host:0", "host:65536", "host:http", "host:", "host:-1", "host:+80", "host: 80", "host:\u00b2"],
)
def test_parse_address_bad_port(address: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_address(address)
    assert "port must be a number from 1 to 65535" in _one_line_naming(error, address)


@pytest.mark.parametrize("address", ["::1:50051", "2001:db8::1:443", "fe80::1:80"])
def test_parse_address_bare_ipv6_needs_brackets(address: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_address(address)
    assert "put an IPv6 host in brackets, e.g. [::1]:50051" in _one_line_naming(error, address)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("a b:80", "'a b' is not a host name or IP address"),
        ("host_name:80", "'host_name' is not a host name or IP address"),
        ("-host:80", "'-host' is not a host name or IP address"),
        ("host.:80", "'host.' is not a host name or IP address"),
        ("evil\nhost:80", "'evil\\nhost' is not a host name or IP address"),
        ("host\n:80", "'host\\n' is not a host name or IP address"),
        ("[not-ipv6]:80", "'not-ipv6' is not an IPv6 address"),
        ("[::1:80", "unbalanced '[' around an IPv6 host"),
    ],
)
def test_parse_address_bad_host(address: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_address(address)
    assert reason in _one_line_naming(error, address)


# -- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version=v2", ("version", "v2")),
        ("example.com/tier=gold", ("example.com/tier", "gold")),
        ("app.kubernetes.io/name=orders", ("app.kubernetes.io/name", "orders")),
        ("canary=", ("canary", "")),
        ("Build_ID=1.2-rc_3", ("Build_ID", "1.2-rc_3")),
        ("k=" + "v" * 63, ("k", "v" * 63)),
    ],
)
def test_parse_label_valid(text: str, expected: tuple[str, str]) -> None:
    assert parse_label(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("version", "expected KEY=VALUE"),
        ("=v2", "name must be 1-63 letters"),
        ("-version=v2", "name must be 1-63 letters"),
        ("k" * 64 + "=v", "name must be 1-63 letters"),
        ("/tier=gold", "prefix must be a DNS subdomain"),
        ("Example.COM/tier=gold", "prefix must be a DNS subdomain"),
        ("bad_prefix/tier=gold", "prefix must be a DNS subdomain"),
        ("version=v 2", "label value 'v 2'"),
        ("version=a=b", "label value 'a=b'"),
        ("version=-v2", "label value '-v2'"),
        ("version=" + "v" * 64, "label value"),
    ],
)
def test_parse_label_invalid(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^label ") as error:
        parse_label(text)
    assert reason in str(error.value)
    assert "\n" not in str(error.value)


def test_check_labels_returns_a_plain_copy() -> None:
    labels = frozen_labels({"version": "v2", "example.com/tier": ""})
    checked = check_labels(labels)
    assert checked == {"version": "v2", "example.com/tier": ""}
    assert type(checked) is dict


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({"ok": "v1", "bad key": "v"}, "label key 'bad key'"),
        ({"ok": "v1", "zone": "eu west"}, "label value 'eu west'"),
        ({"version": "v2\n"}, "label value 'v2\\n'"),
    ],
)
def test_check_labels_invalid(labels: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        check_labels(labels)
    assert reason in str(error.value)


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["orders", "a", "1", "payments-v2", "9lives", "a" * 63])
def test_dns_label_valid(name: str) -> None:
    assert dns_label_problem(name) is None
    assert check_service_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Orders", "-orders", "orders-", "orders_v2", "orders.v2", "a" * 64, "orders\n", " orders"]
)
def test_dns_label_invalid(name: str) -> None:
    problem = dns_label_problem(name)
    assert problem is not None
    assert problem.startswith(f"{name!r} is not a valid name: use at most 63 lowercase letters")
    with pytest.raises(InvalidArgument, match=r"^service "):
        check_service_name(name)


@pytest.mark.parametrize("name", ["orders.v1.Orders", "Echo", "_private.v1.S_1", "grpc.health.v1.Health"])
def test_check_grpc_service_valid(name: str) -> None:
    assert check_grpc_service(name) == name


@pytest.mark.parametrize(
    "name", ["", "orders.v1.", ".orders", "orders..v1", "1orders.v1.S", "orders/v1/S", "orders-v1.S", "a.B\n"]
)
def test_check_grpc_service_invalid(name: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        check_grpc_service(name)
    assert str(error.value) == f"gRPC service {name!r}: expected a full name such as orders.v1.Orders"


@pytest.mark.parametrize(
    ("client_streaming", "server_streaming", "kind"),
    [
        (False, False, MethodKind.UNARY),
        (False, True, MethodKind.SERVER_STREAMING),
        (True, False, MethodKind.CLIENT_STREAMING),
        (True, True, MethodKind.BIDI_STREAMING),
    ],
)
def test_method_kind_of(client_streaming: bool, server_streaming: bool, kind: MethodKind) -> None:
    assert MethodKind.of(client_streaming, server_streaming) is kind


# -- Endpoint records --------------------------------------------------------------------------

FULL = Endpoint(
    service="orders",
    address="[::1]:50051",
    labels=frozen_labels({"version": "v2", "example.com/tier": "gold"}),
    grpc_services=("orders.v1.Orders", "grpc.health.v1.Health"),
    methods=MappingProxyType(
        {"/orders.v1.Orders/Get": MethodKind.UNARY, "/orders.v1.Orders/Watch": MethodKind.SERVER_STREAMING}
    ),
    zone="eu-west-1a",
    weight=5,
    grpc_services_from="reflection",
    registered_at=1700000000.25,
    host="node-7",
    pid=4242,
)


def test_to_json_layout() -> None:
    assert json.loads(FULL.to_json()) == {
        "address": "[::1]:50051",
        "labels": {"version": "v2", "example.com/tier": "gold"},
        "grpcServices": ["orders.v1.Orders", "grpc.health.v1.Health"],
        "grpcServicesFrom": "reflection",
        "methods": {"/orders.v1.Orders/Get": "unary", "/orders.v1.Orders/Watch": "server_streaming"},
        "zone": "eu-west-1a",
        "weight": 5,
        "registeredAt": 1700000000.25,
        "host": "node-7",
        "pid": 4242,
    }


def test_json_round_trip() -> None:
    back = Endpoint.from_json("orders", FULL.to_json(), lease=77, revision=12)
    assert back == FULL
    assert back.id == "[::1]:50051"
    assert back.methods["/orders.v1.Orders/Watch"] is MethodKind.SERVER_STREAMING
    assert (back.lease, back.revision) == (77, 12)


def test_json_round_trip_of_defaults() -> None:
    minimal = Endpoint(service="orders", address="10.0.0.1:50051")
    back = Endpoint.from_json("orders", minimal.to_json())
    assert back == minimal
    assert (back.weight, back.zone, back.grpc_services_from, dict(back.labels)) == (1, "", "given", {})


def test_from_json_fills_defaults_for_missing_fields() -> None:
    back = Endpoint.from_json("payments", b'{"address": "localhost:9000"}')
    assert back == Endpoint(service="payments", address="localhost:9000")


def test_from_json_result_is_immutable() -> None:
    back = Endpoint.from_json("orders", FULL.to_json())
    with pytest.raises(TypeError):
        back.labels["version"] = "v3"  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "Expecting value"),
        (b"[]", "endpoint record is not a JSON object"),
        (b'"10.0.0.1:1"', "endpoint record is not a JSON object"),
        (b"{}", "endpoint record has no address"),
        (b'{"address": 50051}', "endpoint record has no address"),
        (b'{"address": "localhost"}', "address 'localhost' has no port"),
        (b'{"address": "::1:80"}', "put an IPv6 host in brackets"),
        (b'{"address": "h:1", "weight": -1}', "endpoint weight must be an integer >= 0"),
        (b'{"address": "h:1", "weight": "3"}', "endpoint weight must be an integer >= 0"),
        (b'{"address": "h:1", "weight": 1.5}', "endpoint weight must be an integer >= 0"),
        (b'{"address": "h:1", "weight": true}', "endpoint weight must be an integer >= 0"),
        (b'{"address": "h:1", "labels": {"version": 2}}', "endpoint labels must map strings to strings"),
        (b'{"address": "h:1", "labels": ["version"]}', "endpoint labels must map strings to strings"),
        (
            b'{"address": "h:1", "methods": {"/a.B/C": "sideways"}}',
            "endpoint methods must map paths to one of unary, server_streaming",
        ),
    ],
)
def test_from_json_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        Endpoint.from_json("orders", raw)


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ({}, True),
        ({"version": "v2"}, True),
        ({"version": "v2", "zone": "a"}, True),
        ({"version": "v1"}, False),
        ({"version": "v2", "zone": "b"}, False),
        ({"canary": ""}, False),
        ({"Version": "v2"}, False),
    ],
)
def test_matches(selector: dict[str, str], matches: bool) -> None:
    endpoint = Endpoint("orders", "10.0.0.1:1", labels=frozen_labels({"version": "v2", "zone": "a"}))
    assert endpoint.matches(selector) is matches
