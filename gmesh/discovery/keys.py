"""The etcd key layout: the only module that spells a gmesh key.

Everything lives under one prefix (default `/gmesh/v1/`) so several meshes can share one
etcd cluster:

    <prefix>config/<Kind>/<name>       config resources (JSON)
    <prefix>endpoints/<service>/<id>   endpoint records (JSON, leased)
    <prefix>proxies/<id>               running proxies (JSON, leased)
    <prefix>processes/<process>        running proxies and channel processes (JSON, leased)
    <prefix>stats/<service>/<process>  per-process counters of calls to a service (JSON, leased)

The catalog watches the one key range that covers `config/` and `endpoints/`, so churn
elsewhere (quota counters, locks) never wakes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

DEFAULT_PREFIX = "/gmesh/v1/"


def _segment(value: str) -> str:
    # Addresses carry ':' and IPv6 brackets; a key segment must never carry '/'.
    return quote(value, safe="")


@dataclass(frozen=True, slots=True)
class MeshKeys:
    """Builds and parses keys for one mesh prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"mesh prefix must start and end with '/': {self.prefix!r}")

    # config/
    @property
    def config_root(self) -> str:
        return f"{self.prefix}config/"

    def config_kind(self, kind: str) -> str:
        return f"{self.config_root}{kind}/"

    def config(self, kind: str, name: str) -> str:
        return f"{self.config_root}{kind}/{name}"

    # endpoints/
    @property
    def endpoints_root(self) -> str:
        return f"{self.prefix}endpoints/"

    def endpoints_of(self, service: str) -> str:
        return f"{self.endpoints_root}{service}/"

    def endpoint(self, service: str, endpoint_id: str) -> str:
        return f"{self.endpoints_root}{service}/{_segment(endpoint_id)}"

    # proxies/
    @property
    def proxies_root(self) -> str:
        return f"{self.prefix}proxies/"

    def proxy(self, proxy_id: str) -> str:
        return f"{self.proxies_root}{_segment(proxy_id)}"

    # rollouts/ (one state per service), locks/ (leased), stats/ (per process, leased)
    @property
    def rollouts_root(self) -> str:
        return f"{self.prefix}rollouts/"

    def rollout(self, service: str) -> str:
        return f"{self.rollouts_root}{service}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}locks/{_segment(name)}"

    # ca/ : the trust bundle (certificates only, never a key) and join tokens (hashed, leased)
    @property
    def trust_bundle(self) -> str:
        return f"{self.prefix}ca/bundle"

    def join_token(self, digest: str) -> str:
        return f"{self.prefix}ca/tokens/{digest}"

    @property
    def issued_root(self) -> str:
        return f"{self.prefix}ca/issued/"

    def issued(self, serial: str) -> str:
        """A certificate the CA signed (identity, issuer, expiry), leased until it expires."""
        return f"{self.issued_root}{serial}"

    # limits/ : demand of each process for each global rate limit (leased)
    @property
    def limits_root(self) -> str:
        return f"{self.prefix}limits/"

    def limit_demand(self, limit: str, process: str) -> str:
        return f"{self.limits_root}{limit}/{_segment(process)}"

    # quotas/ : per Quota, window and key, the tokens taken (leased until the window is over)
    def quota_window(self, quota: str, window: str) -> str:
        return f"{self.prefix}quotas/{quota}/{window}/"

    def quota_counter(self, quota: str, window: str, key: str) -> str:
        return f"{self.quota_window(quota, window)}{_segment(key)}"

    # processes/ : every running outbound stack (proxies and channel processes), leased
    @property
    def processes_root(self) -> str:
        return f"{self.prefix}processes/"

    def process(self, process: str) -> str:
        return f"{self.processes_root}{_segment(process)}"

    @property
    def stats_root(self) -> str:
        return f"{self.prefix}stats/"

    def stats_of(self, service: str) -> str:
        return f"{self.prefix}stats/{service}/"

    def stats(self, service: str, process: str) -> str:
        return f"{self.stats_of(service)}{_segment(process)}"

    # What the catalog watches: [config/, endpoints/ and everything between].
    @property
    def catalog_range(self) -> tuple[str, str]:
        start = self.config_root
        end = self.endpoints_root[:-1] + chr(ord("/") + 1)  # first key after "endpoints/..."
        return start, end

    def parse(self, key: str) -> ParsedKey | None:
        """What a key under this prefix names, or None for keys gmesh does not know."""
        if not key.startswith(self.prefix):
            return None
        parts = key[len(self.prefix) :].split("/")
        if len(parts) == 3 and parts[0] == "config" and all(parts[1:]):
            return ParsedKey("config", parts[1], parts[2])
        if len(parts) == 3 and parts[0] == "endpoints" and all(parts[1:]):
            return ParsedKey("endpoint", parts[1], _unquote(parts[2]))
        if len(parts) == 2 and parts[0] == "proxies" and parts[1]:
            return ParsedKey("proxy", "", _unquote(parts[1]))
        return None


def _unquote(segment: str) -> str:
    # Endpoint ids are addresses: their only escape is ':' (%3A). urllib's unquote costs 15 us
    # a key, which a catalog of 10,000 endpoints pays on every full read.
    plain = segment.replace("%3A", ":")
    return plain if "%" not in plain else unquote(segment)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """`config`: group=kind, name=resource name; `endpoint`: group=service, name=endpoint id."""

    what: str
    group: str
    name: str
