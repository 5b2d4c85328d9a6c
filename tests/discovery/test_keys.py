"""MeshKeys: the etcd key layout, built and parsed."""

import pytest

from gmesh.discovery.keys import DEFAULT_PREFIX, MeshKeys, ParsedKey

KEYS = MeshKeys()


def test_default_prefix() -> None:
    assert KEYS.prefix == DEFAULT_PREFIX == "/gmesh/v1/"


def test_config_keys() -> None:
    assert KEYS.config_root == "/gmesh/v1/config/"
    assert KEYS.config_kind("Service") == "/gmesh/v1/config/Service/"
    assert KEYS.config("Service", "orders") == "/gmesh/v1/config/Service/orders"
    assert MeshKeys("/other/").config("Route", "r1") == "/other/config/Route/r1"


@pytest.mark.parametrize(
    ("endpoint_id", "segment"),
    [
        ("10.0.0.1:50051", "10.0.0.1%3A50051"),
        ("[::1]:50051", "%5B%3A%3A1%5D%3A50051"),
        ("[2001:db8::1]:443", "%5B2001%3Adb8%3A%3A1%5D%3A443"),
        ("a/b", "a%2Fb"),
    ],
)
def test_endpoint_key_encodes_id_into_one_segment(endpoint_id: str, segment: str) -> None:
    key = KEYS.endpoint("orders", endpoint_id)
    assert key == f"/gmesh/v1/endpoints/orders/{segment}"
    assert key.removeprefix(KEYS.endpoints_of("orders")).count("/") == 0


def test_endpoints_and_proxies_roots() -> None:
    assert KEYS.endpoints_root == "/gmesh/v1/endpoints/"
    assert KEYS.endpoints_of("orders") == "/gmesh/v1/endpoints/orders/"
    assert KEYS.proxies_root == "/gmesh/v1/proxies/"
    assert KEYS.proxy("host-1:4000") == "/gmesh/v1/proxies/host-1%3A4000"


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        (KEYS.config("Service", "orders"), ParsedKey("config", "Service", "orders")),
        (KEYS.endpoint("orders", "10.0.0.1:50051"), ParsedKey("endpoint", "orders", "10.0.0.1:50051")),
        (KEYS.endpoint("orders", "[::1]:50051"), ParsedKey("endpoint", "orders", "[::1]:50051")),
        (KEYS.endpoint("orders", "100%:x/y"), ParsedKey("endpoint", "orders", "100%:x/y")),
        (KEYS.proxy("[fe80::1]:15001"), ParsedKey("proxy", "", "[fe80::1]:15001")),
    ],
)
def test_parse_round_trips(key: str, parsed: ParsedKey) -> None:
    assert KEYS.parse(key) == parsed


@pytest.mark.parametrize(
    "key",
    [
        "/other/config/Service/orders",  # another prefix
        "/gmesh/v2/config/Service/orders",
        "gmesh/v1/config/Service/orders",
        "/gmesh/v1/quota/orders/x",  # a family gmesh does not parse
        "/gmesh/v1/config/Service",  # too shallow
        "/gmesh/v1/config/Service/",  # empty name
        "/gmesh/v1/config//orders",  # empty kind
        "/gmesh/v1/config/Service/orders/extra",  # too deep
        "/gmesh/v1/endpoints/orders",
        "/gmesh/v1/endpoints/orders/10.0.0.1%3A1/x",
        "/gmesh/v1/proxies/",
        "/gmesh/v1/proxies/a/b",
        "/gmesh/v1/",
    ],
)
def test_parse_returns_none_for_foreign_keys_and_wrong_depth(key: str) -> None:
    assert KEYS.parse(key) is None


def test_parse_only_knows_its_own_prefix() -> None:
    other = MeshKeys("/mesh-b/")
    assert other.parse(KEYS.config("Service", "orders")) is None
    assert other.parse(other.config("Service", "orders")) == ParsedKey("config", "Service", "orders")


def test_catalog_range_bounds() -> None:
    assert KEYS.catalog_range == ("/gmesh/v1/config/", "/gmesh/v1/endpoints0")


@pytest.mark.parametrize(
    ("key", "inside"),
    [
        (KEYS.config_root, True),
        (KEYS.config("Service", "orders"), True),
        (KEYS.config("Route", "zzz"), True),
        (KEYS.endpoints_root, True),
        (KEYS.endpoint("orders", "10.0.0.1:50051"), True),
        (KEYS.endpoint("zzz", "[::1]:1"), True),
        (KEYS.endpoint("~~~", "\uffff"), True),
        (KEYS.proxy("p1"), False),
        (KEYS.proxies_root, False),
        ("/gmesh/v1/quota/orders/bucket", False),
        ("/gmesh/v1/locks/apply", False),
        ("/gmesh/v1/aaa", False),
        ("/gmesh/v1/endpointsX/orders/a", False),
        ("/gmesh/v0/config/Service/orders", False),
        ("/gmesh/v1", False),
    ],
)
def test_catalog_range_covers_config_and_endpoints_only(key: str, inside: bool) -> None:
    start, end = KEYS.catalog_range
    assert (start <= key < end) is inside


@pytest.mark.parametrize("prefix", ["", "gmesh/v1/", "/gmesh/v1", "gmesh"])
def test_invalid_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="mesh prefix must start and end with '/'"):
        MeshKeys(prefix)
