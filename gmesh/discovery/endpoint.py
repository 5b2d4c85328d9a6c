"""Endpoint records (one serving address of a service) and the syntax rules for their parts.

Names follow the conventions mesh users know from Kubernetes: service names are DNS
labels, label keys are `[prefix/]name`, label values are at most 63 characters.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from gmesh.errors import InvalidArgument

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_HOSTNAME = re.compile(
    r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)
_GRPC_SERVICE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def dns_label_problem(name: str) -> str | None:
    """Why `name` is not a valid service or resource name, or None if it is."""
    if _DNS_LABEL.fullmatch(name):
        return None
    return (
        f"{name!r} is not a valid name: use at most 63 lowercase letters, digits and '-', "
        "starting and ending with a letter or digit"
    )


def check_service_name(name: str) -> str:
    problem = dns_label_problem(name)
    if problem:
        raise InvalidArgument(f"service {problem}")
    return name


def label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _LABEL_PREFIX.fullmatch(prefix)):
        return f"label key {key!r}: prefix must be a DNS subdomain (e.g. example.com/tier)"
    if not _LABEL_NAME.fullmatch(name):
        return (
            f"label key {key!r}: name must be 1-63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    if _LABEL_VALUE.fullmatch(value):
        return None
    return (
        f"label value {value!r}: at most 63 letters, digits, '-', '_' or '.', "
        "starting and ending with a letter or digit"
    )


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise InvalidArgument(problem)
    return dict(labels)


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` as written on a command line."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidArgument(f"label {text!r}: expected KEY=VALUE, e.g. version=v2")
    check_labels({key: value})
    return key, value


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) -> (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or (address.startswith("[") and address.endswith("]")):
        raise InvalidArgument(f"address {address!r} has no port: expected HOST:PORT, e.g. 127.0.0.1:50051")
    if not host:
        raise InvalidArgument(f"address {address!r} has no host: expected HOST:PORT, e.g. 127.0.0.1:50051")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidArgument(f"address {address!r}: unbalanced '[' around an IPv6 host")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidArgument(f"address {address!r}: {host[1:-1]!r} is not an IPv6 address") from None
    elif ":" in host:
        raise InvalidArgument(f"address {address!r}: put an IPv6 host in brackets, e.g. [::1]:50051")
    elif not _HOSTNAME.fullmatch(host):
        raise InvalidArgument(f"address {address!r}: {host!r} is not a host name or IP address")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidArgument(f"address {address!r}: port must be a number from 1 to 65535")
    return host, int(port)


def check_grpc_service(name: str) -> str:
    if not _GRPC_SERVICE.fullmatch(name):
        raise InvalidArgument(f"gRPC service {name!r}: expected a full name such as orders.v1.Orders")
    return name


class MethodKind(StrEnum):
    """The four kinds of gRPC method, as learned from server reflection."""

    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"
    CLIENT_STREAMING = "client_streaming"
    BIDI_STREAMING = "bidi_streaming"

    @classmethod
    def of(cls, client_streaming: bool, server_streaming: bool) -> MethodKind:
        if client_streaming and server_streaming:
            return cls.BIDI_STREAMING
        if client_streaming:
            return cls.CLIENT_STREAMING
        if server_streaming:
            return cls.SERVER_STREAMING
        return cls.UNARY


_EMPTY: Mapping[str, Any] = MappingProxyType({})
_KINDS = {kind.value: kind for kind in MethodKind}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address serving a mesh service, as registered in etcd. Immutable.

    `grpc_services` lets a proxy find the destination from a method path; `methods` (from
    reflection, may be empty) tells the kind of each method. `tls`: the address where the
    endpoint serves mutual TLS with a mesh certificate ('' = none; equal to `address` when it
    serves only mTLS, STRICT). `lease` and `revision` come from etcd and are not part of the
    stored JSON.
    """

    service: str
    address: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    grpc_services: tuple[str, ...] = ()
    methods: Mapping[str, MethodKind] = field(default_factory=lambda: _EMPTY)
    zone: str = ""
    weight: int = 1
    grpc_services_from: str = "given"
    registered_at: float = 0.0
    host: str = ""
    pid: int = 0
    tls: str = ""
    lease: int = field(default=0, compare=False)
    revision: int = field(default=0, compare=False)

    @property
    def id(self) -> str:
        return self.address

    def to_json(self) -> bytes:
        tls = {"tls": self.tls} if self.tls else {}
        return json.dumps(
            {
                **tls,
                "address": self.address,
                "labels": dict(self.labels),
                "grpcServices": list(self.grpc_services),
                "grpcServicesFrom": self.grpc_services_from,
                "methods": {k: v.value for k, v in self.methods.items()},
                "zone": self.zone,
                "weight": self.weight,
                "registeredAt": self.registered_at,
                "host": self.host,
                "pid": self.pid,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(
        cls, service: str, raw: bytes, *, lease: int = 0, revision: int = 0, like: Endpoint | None = None
    ) -> Endpoint:
        """Parse a stored record; raises ValueError (with the reason) on a malformed one.

        `like`: another endpoint of the same service; its labels, gRPC services and methods
        are shared when they are equal (endpoints of a service mostly are), which saves the
        parsing and the memory of 10,000 copies in a big mesh.
        """
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("endpoint record is not a JSON object")
        address = data.get("address")
        if not isinstance(address, str):
            raise ValueError("endpoint record has no address")
        try:
            parse_address(address)
        except InvalidArgument as exc:
            raise ValueError(str(exc)) from None
        raw_labels = data.get("labels") or {}
        labels: Mapping[str, str]
        if like is not None and raw_labels == like.labels:
            labels = like.labels
        elif not isinstance(raw_labels, dict) or not all(isinstance(v, str) for v in raw_labels.values()):
            raise ValueError("endpoint labels must map strings to strings")
        else:
            labels = MappingProxyType(dict(raw_labels))
        weight = data.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise ValueError("endpoint weight must be an integer >= 0")
        raw_methods = data.get("methods") or {}
        methods: Mapping[str, MethodKind]
        if like is not None and raw_methods == like.methods:  # MethodKind values equal their strings
            methods = like.methods
        else:
            try:
                methods = MappingProxyType({str(k): _KINDS[v] for k, v in raw_methods.items()})
            except (KeyError, TypeError, AttributeError):
                raise ValueError(f"endpoint methods must map paths to one of {', '.join(_KINDS)}") from None
        tls = data.get("tls") or ""
        if tls:
            if not isinstance(tls, str):
                raise ValueError("endpoint tls must be an address")
            try:
                parse_address(tls)
            except InvalidArgument as exc:
                raise ValueError(f"tls: {exc}") from None
        grpc_services = tuple(str(s) for s in data.get("grpcServices") or ())
        if like is not None and grpc_services == like.grpc_services:
            grpc_services = like.grpc_services
        return cls(
            service=service,
            address=address,
            labels=labels,
            grpc_services=grpc_services,
            methods=methods,
            zone=str(data.get("zone") or ""),
            weight=weight,
            grpc_services_from=str(data.get("grpcServicesFrom") or "given"),
            registered_at=float(data.get("registeredAt") or 0.0),
            host=str(data.get("host") or ""),
            pid=int(data.get("pid") or 0),
            tls=tls,
            lease=lease,
            revision=revision,
        )

    def matches(self, selector: Mapping[str, str]) -> bool:
        """True when every label of `selector` is on this endpoint with the same value."""
        labels = self.labels
        return all(labels.get(k) == v for k, v in selector.items())


def frozen_labels(labels: Iterable[tuple[str, str]] | Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(labels))
