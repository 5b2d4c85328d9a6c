"""`gmesh explain`: how the mesh handles one call, from the compiled route table the data path runs."""

from __future__ import annotations

import collections
from typing import Any

import click

from gmesh.balancer.backends import Backends
from gmesh.chain.call import Call, Caller
from gmesh.chain.compose import order
from gmesh.cli.common import MeshTarget, mesh_options, run, table
from gmesh.config.types import format_duration
from gmesh.discovery.catalog import Catalog, MeshSnapshot
from gmesh.errors import InvalidArgument, NotFound
from gmesh.outbound.mesh import MeshState, compile_chain
from gmesh.pluginmanager import Plugins
from gmesh.routing.table import BackendKey, CompiledRule, compile_table


def _pairs(values: tuple[str, ...], what: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} {item!r}: write KEY=VALUE")
        pairs.append((key.strip().lower() if what == "-H" else key.strip(), value))
    return tuple(pairs)


def _backend_text(key: BackendKey, service: str) -> str:
    target, subset = key
    what = f"subset {subset}" if subset else "all endpoints"
    return what if target == service else f"service {target}, {what}"


async def _snapshot(target: MeshTarget, plugins: Plugins) -> tuple[MeshSnapshot, str]:
    """The mesh now, and its trust domain (gmesh.local when it has no CA)."""
    from gmesh.security.tokens import read_bundle

    async with target.store() as store, Catalog(store, target.keys, plugins.config_kinds()) as catalog:
        bundle = await read_bundle(store, target.keys)
        return catalog.snapshot, bundle.trust_domain if bundle is not None else "gmesh.local"


async def _noop(call: Call[None]) -> None:
    return None


def explain_call(
    snapshot: MeshSnapshot,
    plugins: Plugins,
    service: str,
    method: str,
    metadata: tuple[tuple[str, str], ...],
    caller: Caller,
    n: int,
) -> dict[str, Any]:
    """What the data path would do with this call (and with `n` like it), as plain data."""
    if not snapshot.has_service(service):
        known = ", ".join(snapshot.services()) or "none"
        raise NotFound(f"no mesh service {service!r} (known: {known})")
    # The same compile the proxy and channels run, on a mesh state of this process's own.
    mesh = MeshState(lambda: snapshot)
    route = compile_table(service, snapshot)
    chain = compile_chain(snapshot, order(plugins.filter_factories()), service, mesh)
    call: Call[None] = Call(method, metadata, None, service, _noop, None, caller=caller)
    table_backends = mesh.backends
    result: dict[str, Any] = {
        "service": service,
        "revision": snapshot.revision,
        "chain": list(chain.filters),
        "chainError": chain.error,
        "route": route.route if route else None,
        "rules": [],
    }
    rule: CompiledRule | None = None
    if route is not None:
        for compiled, failed in route.explain(call):
            result["rules"].append({"name": compiled.name, "matched": failed is None, "failed": failed})
            if failed is None:
                rule = compiled
    result["rule"] = rule.name if rule else None
    if rule is not None:
        weights = [
            {"backend": _backend_text(key, service), "weight": w, "endpoints": _size(table_backends, key)}
            for key, w in zip(rule.split.choices, rule.split.weights, strict=True)
        ]
        keys = [rule.choose(call) for _ in range(max(n, 1))]
    else:
        weights = [{"backend": _backend_text((service, None), service), "weight": 100,
                    "endpoints": _size(table_backends, (service, None))}]  # fmt: skip
        keys = [(service, None)] * max(n, 1)
    result["backends"] = weights
    picks: collections.Counter[tuple[str, str]] = collections.Counter()
    for key in keys:
        endpoint = table_backends.get(key).picker.pick(call)
        picks[(_backend_text(key, service), endpoint.address if endpoint else "(no endpoint)")] += 1
    result["picks"] = [{"backend": b, "endpoint": e, "calls": c} for (b, e), c in sorted(picks.items())]
    resource = snapshot.resource("Service", service)
    default_timeout = getattr(resource.spec, "timeout", None) if resource else None
    result["timeout"] = (
        f"{format_duration(rule.timeout)} (rule {rule.name})"
        if rule is not None and rule.timeout is not None
        else f"{format_duration(default_timeout)} (Service default, when the caller sets none)"
        if default_timeout is not None
        else "the caller's deadline (none set by the mesh)"
    )
    result["retry"] = rule.retry.describe() if rule is not None and rule.retry is not None else "none"
    budget = getattr(resource.spec, "retry_budget", None) if resource else None
    if budget is not None:
        result["retry_budget"] = (
            f"{budget.percent:g}% of calls + {budget.min_per_second:g}/s"
            f" over {format_duration(budget.window)}"
        )
    else:
        result["retry_budget"] = "20% of calls + 10/s over 10s (default)"
    result["resilience"] = _resilience(resource.spec if resource is not None else None, rule, service)
    if rule is not None and rule.mirror is not None:
        result["mirror"] = f"{rule.mirror_share * 100:g}% to {_backend_text(rule.mirror, service)}"
    if rule is not None and rule.fault is not None:
        f = rule.fault
        parts = []
        if f.abort_share:
            parts.append(f"abort {f.abort_share * 100:g}% with {f.abort_code.name}")
        if f.delay_share:
            parts.append(f"delay {f.delay_share * 100:g}% by {format_duration(f.delay)}")
        result["fault"] = "; ".join(parts)
    result["authorization"] = _authorization(snapshot, service, method, metadata, caller.identity)
    result["limits"] = _limits(snapshot, service, call)
    result["quotas"] = _quotas(snapshot, service, call)
    return result


def _limits(snapshot: MeshSnapshot, service: str, call: Call[None]) -> list[dict[str, Any]]:
    """The RateLimits that count this call (compiled as the data path compiles them)."""
    from gmesh.ratelimit.limits import caller_key, limits_of
    from gmesh.ratelimit.spec import KIND, format_rate

    states: dict[str, Any] = {}
    limits = limits_of(
        snapshot.resources.get(KIND, {}), service, lambda k, make: states.setdefault(k, make())
    )
    out = []
    for limit in limits:
        if not limit.applies(call.method, call.metadata):
            continue
        spec = limit.spec
        key: Any = None
        if spec.key == "caller":
            key = caller_key(call)
        elif spec.key is not None:
            key = next((v for k, v in call.metadata if k == spec.key.partition(":")[2]), None)
        override = next((o for o in spec.overrides if o.key == key), None)
        rate = override.rate if override else spec.rate
        burst = spec.burst_of(rate, override.burst if override else spec.burst)
        out.append({"name": limit.name, "rate": format_rate(rate), "burst": burst, "key": spec.key,
                    "keyValue": key, "override": override is not None, "mode": spec.mode,
                    "scope": spec.scope})  # fmt: skip
    return out


def _quotas(snapshot: MeshSnapshot, service: str, call: Call[None]) -> list[dict[str, Any]]:
    """The Quotas that count this call, with the key it would be counted under."""
    from gmesh.config.types import format_duration
    from gmesh.ratelimit.limits import CallMatch, key_function
    from gmesh.ratelimit.quota import KIND as QUOTA_KIND

    out = []
    for name, resource in sorted(snapshot.resources.get(QUOTA_KIND, {}).items()):
        spec: Any = resource.spec
        if spec.service != service or not CallMatch(spec.methods, spec.metadata).applies(
            call.method, call.metadata
        ):
            continue
        out.append({"name": name, "limit": spec.limit, "window": format_duration(spec.window),
                    "align": spec.align, "key": spec.key, "keyValue": key_function(spec.key)(call),
                    "mode": spec.mode})  # fmt: skip
    return out


async def _live_state(target: MeshTarget, snapshot: MeshSnapshot, result: dict[str, Any]) -> None:
    """What etcd says now: a global limit's processes and shares, a quota's use in this window."""
    import json as _json
    import time as clock

    from gmesh.config.types import format_duration
    from gmesh.ratelimit.quota import KIND as QUOTA_KIND
    from gmesh.ratelimit.quota import counter_name, window_of
    from gmesh.ratelimit.shares import HEADROOM, max_min_shares
    from gmesh.ratelimit.spec import KIND as LIMIT_KIND

    async with target.store() as store:
        for limit in result.get("limits", ()):
            if limit["scope"] != "global":
                continue
            kvs, _ = await store.get_prefix(f"{target.keys.limits_root}{limit['name']}/")
            demands = {kv.key.rsplit("/", 1)[1]: float(_json.loads(kv.value)["demand"]) for kv in kvs}
            rate = snapshot.resources[LIMIT_KIND][limit["name"]].spec.rate  # type: ignore[attr-defined]
            shares = max_min_shares(rate, {p: d * HEADROOM for p, d in demands.items()})
            limit["global"] = {
                p: {"demand": demands[p], "share": round(s, 2)} for p, s in sorted(shares.items())
            }
        for quota in result.get("quotas", ()):
            spec: Any = snapshot.resources[QUOTA_KIND][quota["name"]].spec
            window, ends = window_of(spec, clock.time())
            key = quota["keyValue"]
            kv = await store.get(target.keys.quota_counter(quota["name"], str(window), counter_name(key)))
            quota["used"] = int(kv.value) if kv is not None else 0
            quota["windowEndsIn"] = format_duration(round(ends - clock.time()))


def _authorization(
    snapshot: MeshSnapshot, service: str, method: str, metadata: tuple[tuple[str, str], ...], identity: str
) -> dict[str, Any]:
    """Where the call is received: the TLS mode and the policies' decision, from the same compiled
    rules the inbound proxy and `gmesh.server_interceptors()` run."""
    from gmesh.security.authz import KIND, Authorizers
    from gmesh.security.enforce import mode_of

    authorizer = Authorizers().for_service(snapshot.resources.get(KIND), service)
    mode = mode_of(snapshot, service)
    decision = authorizer.decide(identity, method, metadata)
    out: dict[str, Any] = {
        "caller": identity or None,
        "tlsMode": mode,
        "allowed": decision.allowed,
        "policy": decision.policy or None,
        "reason": decision.reason,
        "audits": list(decision.audits),
    }
    if not identity and mode == "STRICT":
        out.update(allowed=False, reason="tls.mode STRICT: a caller without a mesh identity is refused")
    return out


def _size(table: Backends, key: BackendKey) -> int:
    return table.get(key).size


def _resilience(spec: Any, rule: CompiledRule | None, service: str) -> list[str]:
    """The Service's balancing and resilience policy, as lines for people."""
    if spec is None:
        return ["balancer: weighted_round_robin (no Service resource)"]
    balancer = spec.balancer
    keys = list(rule.split.choices) if rule is not None else [(service, None)]
    policies = []
    for _, subset in keys:
        policy = balancer.subsets.get(subset, balancer) if subset else balancer
        text = policy.policy + (f" on {policy.hash_key}" if policy.hash_key else "")
        policies.append(f"{subset}: {text}" if subset and subset in balancer.subsets else text)
    lines = ["balancer: " + ", ".join(dict.fromkeys(policies))]
    if balancer.zone_aware is not None:
        lines[0] += f"; zone aware (>= {balancer.zone_aware.min_healthy_percent:g}% usable stays local)"
    if spec.health_check is not None:
        hc = spec.health_check
        lines.append(
            f"health check: every {format_duration(hc.interval)}, out after {hc.unhealthy_threshold} failed,"
            f" back after {hc.healthy_threshold} passed"
        )
    if spec.outlier_detection is not None:
        od = spec.outlier_detection
        modes = [f"{od.consecutive_errors} errors in a row"] if od.consecutive_errors else []
        if od.failure_percentage is not None:
            modes.append(f">= {od.failure_percentage.threshold:g}% failing")
        if od.success_rate is not None:
            modes.append("success-rate outliers")
        lines.append(
            f"outlier ejection: {', '.join(modes) or 'none'}; {format_duration(od.base_ejection_time)} x n,"
            f" at most {od.max_ejection_percent:g}% ejected; panic below {spec.panic_threshold:g}% usable"
        )
    if spec.circuit_breaker is not None:
        cb = spec.circuit_breaker
        limits = [
            f"{label} {value}"
            for label, value in (
                ("maxRequests", cb.max_requests),
                ("maxPending", cb.max_pending if cb.max_requests is not None else None),
                ("maxRetries", cb.max_retries),
                ("maxRequestsPerEndpoint", cb.max_requests_per_endpoint),
            )
            if value is not None
        ]
        lines.append("circuit breaker: " + (", ".join(limits) or "none"))
    return lines


def render(result: dict[str, Any], n: int) -> str:
    lines = [f"service {result['service']} at revision {result['revision']}"]
    lines.append(f"chain: {' -> '.join(result['chain'])}")
    if result.get("chainError"):
        lines.append(f"  every call is refused (UNAVAILABLE): {result['chainError']}")
    if result["route"] is None:
        lines.append("route: none (every call goes to all endpoints of the service)")
    else:
        lines.append(f"route: Route/{result['route']}")
        for i, r in enumerate(result["rules"], 1):
            verdict = "MATCH" if r["matched"] else f"no: {r['failed']} does not hold"
            lines.append(f"  {i}. {r['name']}: {verdict}")
        if result["rule"] is None:
            lines.append("  no rule matched: all endpoints of the service")
    lines.append("backends:")
    for b in result["backends"]:
        plural = "s" if b["endpoints"] != 1 else ""
        lines.append(f"  {b['backend']}: weight {b['weight']}, {b['endpoints']} endpoint{plural}")
    if n <= 1:
        pick = result["picks"][0]
        lines.append(f"chosen: {pick['backend']} -> {pick['endpoint']}")
    else:
        rows = [
            [p["backend"], p["endpoint"], str(p["calls"]), f"{p['calls'] / n:.1%}"] for p in result["picks"]
        ]
        lines.append(f"{n} simulated calls:")
        lines.extend(
            "  " + line for line in table(["BACKEND", "ENDPOINT", "CALLS", "SHARE"], rows).splitlines()
        )
    lines.append(f"timeout: {result['timeout']}")
    lines.append(f"retry: {result['retry']}; budget {result['retry_budget']}")
    lines.extend(result["resilience"])
    if "mirror" in result:
        lines.append(f"mirror: {result['mirror']}")
    if "fault" in result:
        lines.append(f"fault: {result['fault']}")
    for limit in result.get("limits", ()):
        text = f"rate limit {limit['name']}: {limit['rate']} burst {limit['burst']}"
        if limit["key"]:
            shown = limit["keyValue"] if limit["keyValue"] is not None else "(none: shared by such calls)"
            text += (
                f" per {limit['key']} (this call's key: {shown}{', overridden' if limit['override'] else ''})"
            )
        if limit["mode"] == "shadow":
            text += " (shadow: counted, never refused)"
        lines.append(text)
        for process, state in (limit.get("global") or {}).items():
            lines.append(f"  global: {process} wants {state['demand']:g}/s, may admit {state['share']:g}/s")
    if any(limit["scope"] != "global" for limit in result.get("limits", ())):
        lines.append(
            "  (each proxy and channel process counts for itself; its config dump shows its buckets)"
        )
    for quota in result.get("quotas", ()):
        text = f"quota {quota['name']}: {quota['limit']} per {quota['window']}"
        if quota["align"] == "rolling":
            text += " (rolling)"
        if quota["key"]:
            text += f" per {quota['key']} (this call's key: {quota['keyValue']})"
        if "used" in quota:
            text += f"; {quota['used']} used in this window (ends in {quota['windowEndsIn']})"
        lines.append(text)
    authz = result.get("authorization")
    if authz is not None:
        who = authz["caller"] or "a caller without identity"
        verdict = "ALLOWED" if authz["allowed"] else "DENIED (PERMISSION_DENIED)"
        lines.append(f"authorization (tls.mode {authz['tlsMode']}): {who}: {verdict}: {authz['reason']}")
        if authz["audits"]:
            lines.append(f"  audited by: {', '.join(authz['audits'])}")
    return "\n".join(lines)


@click.command()
@click.argument("service")
@click.argument("method")
@click.option(
    "-H", "--header", "headers", multiple=True, metavar="KEY=VALUE", help="request metadata (repeat)"
)
@click.option("--caller-label", multiple=True, metavar="KEY=VALUE", help="a label of the calling workload")
@click.option(
    "--from",
    "--caller-identity",
    "caller_identity",
    default="",
    metavar="IDENTITY",
    help="the caller's mesh identity: a SPIFFE ID, or a service name (spiffe://<trust-domain>/svc/NAME)",
)
@click.option(
    "-n", "--n", "n", type=click.IntRange(1, 1_000_000), default=1, show_default=True,
    help="simulate N calls like this one and print how they spread",
)  # fmt: skip
@click.option(
    "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="text for people, json for scripts",
)  # fmt: skip
@mesh_options
def explain(
    target: MeshTarget,
    service: str,
    method: str,
    headers: tuple[str, ...],
    caller_label: tuple[str, ...],
    caller_identity: str,
    n: int,
    output: str,
) -> None:
    """Explain how the mesh handles a call to SERVICE's METHOD (`/pkg.Service/Method`).

    Prints which route rule matches and why earlier ones do not, the weighted backends,
    the endpoint chosen (or with --n, how N such calls spread), and the timeout, retry
    policy and budget that apply, and whether SERVICE would admit the call from --from
    (its TLS mode and AuthorizationPolicies). It runs the same compiled route table, pickers
    and policies the proxies and channels run, on the config and endpoints in etcd now.

    \b
    gmesh explain orders /orders.v1.Orders/Get -H x-tier=beta
    gmesh explain orders /orders.v1.Orders/Get -H x-user-id=42 --n 10000
    gmesh explain orders /orders.v1.Orders/Delete --from web
    """
    if not method.startswith("/") or method.count("/") != 2:
        raise InvalidArgument(f"method {method!r}: write the full path, /package.Service/Method")
    metadata = _pairs(headers, "-H")
    labels = dict(_pairs(caller_label, "--caller-label"))
    plugins = Plugins.load()
    snapshot, trust_domain = run(_snapshot(target, plugins))
    if caller_identity and not caller_identity.startswith("spiffe://"):
        from gmesh.security.ca import spiffe_id

        caller_identity = spiffe_id(trust_domain, caller_identity)
    caller = Caller(identity=caller_identity, labels=labels)
    result = explain_call(snapshot, plugins, service, method, metadata, caller, n)
    if any(limit["scope"] == "global" for limit in result["limits"]) or result["quotas"]:
        run(_live_state(target, snapshot, result))
    if output == "json":
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(render(result, n))
