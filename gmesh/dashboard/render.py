"""The dashboard's pages, rendered on the server as HTML fragments from the model.

Every text that comes from etcd (names, labels, addresses, YAML, reasons) goes through `e()`
(html.escape, quotes included) and every path segment through `u()`; the page's Content
Security Policy admits no inline script or style on top of that. Colours are classes, the
graph is inline SVG laid out here (layers by call depth), the JavaScript only swaps fragments.
"""

from __future__ import annotations

import difflib
import html
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import yaml

from gmesh.config.types import age
from gmesh.dashboard.model import HISTORY, MeshView, Rate
from gmesh.rollout.controller import RolloutState
from gmesh.stats.golden import format_ms, format_percent

#: the graph is drawn up to this many nodes; above, the table alone
MAX_DRAWN = 150
#: node box and grid
NODE_W, NODE_H, COL_W, ROW_H, MARGIN = 210, 46, 520, 84, 24


def e(value: object) -> str:
    """Text for HTML content and quoted attributes."""
    return html.escape(str(value), quote=True)


def u(value: str) -> str:
    """One URL path segment."""
    return quote(value, safe="")


def rps(value: float) -> str:
    return f"{value:.1f}/s" if value < 100 else f"{value:.0f}/s"


pct, ms = format_percent, format_ms


def health(rate: Rate) -> str:
    """CSS class of a group of calls: ok, warn (< 99.5% success), bad (< 95%), idle (none)."""
    success = rate.signals.success_rate
    if success is None or rate.rps <= 0:
        return "idle"
    return "ok" if success >= 0.995 else "warn" if success >= 0.95 else "bad"


def ago(seconds: float) -> str:
    return age(max(seconds, 0.0))  # clocks of other machines may be a little ahead


def table(headers: Sequence[str], rows: Iterable[str], *, cls: str = "", empty: str = "none") -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="empty">{e(empty)}</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def banner(view: MeshView, now: float) -> str:
    parts = []
    if view.error:
        parts.append(
            f'<div class="banner bad" id="etcd-down">etcd is unreachable since '
            f"{e(time.strftime('%H:%M:%S', time.localtime(view.error_since)))} "
            f"({e(ago(now - view.error_since))}): showing what was read "
            f"{e(ago(now - view.read_at)) if view.read_at else 'never'} ago. {e(view.error)}</div>"
        )
    text, until = view.notice
    if text and now < until:
        parts.append(f'<div class="banner note">{e(text)}</div>')
    return "".join(parts)


# --------------------------------------------------------------------------------- graph


def layout(nodes: Sequence[str], edges: Iterable[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """Column and row of each node: callers left of what they call (the longest call path from
    a node nobody calls; a cycle is cut where a depth-first walk comes back), rows ordered by
    their callers' rows."""
    known = set(nodes)
    pairs = sorted({(a, b) for a, b in edges if a != b and a in known and b in known})
    calls: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in pairs:
        calls[a].append(b)
    # depth-first from nodes nobody calls (then any left), without recursion: finish order
    called = {b for _, b in pairs}
    state: dict[str, int] = {}  # 1: on the walk's path, 2: done
    finished: list[str] = []
    back: set[tuple[str, str]] = set()
    for root in [n for n in nodes if n not in called] + list(nodes):
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(calls[root]))]
        while stack:
            node, todo = stack[-1]
            nxt = next(todo, None)
            if nxt is None:
                state[node] = 2
                finished.append(node)
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(calls[nxt])))
    column = dict.fromkeys(nodes, 0)
    for node in reversed(finished):  # a topological order of the edges left
        for b in calls[node]:
            if (node, b) not in back:
                column[b] = max(column[b], column[node] + 1)
    callers: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in pairs:
        callers[b].append(a)
    place: dict[str, tuple[int, int]] = {}
    for col in sorted(set(column.values())):
        members = [n for n in nodes if column[n] == col]

        def weight(n: str) -> tuple[float, str]:
            rows = [place[c][1] for c in callers[n] if c in place]
            return (sum(rows) / len(rows) if rows else float("inf"), n)

        for row, n in enumerate(sorted(members, key=weight)):
            place[n] = (col, row)
    return place


def _short(name: str, width: int = 26) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def graph_svg(view: MeshView, services: Sequence[str], edges: Mapping[tuple[str, str], Rate]) -> str:
    sources = sorted({a for a, _ in edges} - set(services))
    nodes = [*sources, *services]
    place = layout(nodes, edges)
    columns = max((c for c, _ in place.values()), default=0) + 1
    rows = max((r for _, r in place.values()), default=0) + 1
    width = MARGIN * 2 + (columns - 1) * COL_W + NODE_W
    height = MARGIN * 2 + (rows - 1) * ROW_H + NODE_H

    def box(n: str) -> tuple[int, int]:
        col, row = place[n]
        return MARGIN + col * COL_W, MARGIN + row * ROW_H

    out = [
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="service graph">'
    ]
    for (a, b), rate in sorted(edges.items()):
        if a == b or a not in place or b not in place:
            continue
        x1, y1 = box(a)
        x2, y2 = box(b)
        sx, sy, tx, ty = x1 + NODE_W, y1 + NODE_H // 2, x2, y2 + NODE_H // 2
        if tx <= sx:  # a call back to an earlier column: loop below
            path = f"M{sx},{sy} C{sx + 60},{sy + 70} {tx - 60},{ty + 70} {tx},{ty}"
        else:
            bend = (tx - sx) * 0.65  # level at both ends: the label sits on the first stretch
            path = f"M{sx},{sy} C{sx + bend:.0f},{sy} {tx - bend:.0f},{ty} {tx},{ty}"
        s = rate.summary()
        label = f"{rps(rate.rps)} · {pct(s['successRate'])} · p99 {ms(s['p99Ms'])}"
        # along the first, level stretch of the curve, on the side it does not bend to
        lx, ly = sx + 14, (sy + 16) if ty < sy else (sy - 7)

        out.append(
            f'<g class="edge {health(rate)}" data-from="{e(a)}" data-to="{e(b)}">'
            f"<title>{e(a)} → {e(b)}: {e(label)}</title>"
            f'<path d="{path}" marker-end="url(#arrow)"/>'
            f'<text x="{lx}" y="{ly}">{e(label)}</text></g>'
        )
    for n in nodes:
        x, y = box(n)
        if n in sources:
            kind, sub, cls, link = "caller", "caller", "source", ""
        else:
            eps = len(view.snapshot.endpoints_of(n))
            total = view.total(n)
            states = [v.state for v in view.endpoint_views.get(n, {}).values()]
            bad = sum(1 for s in states if s in ("unreachable", "ejected", "unhealthy"))
            cls = "bad" if eps == 0 else "warn" if bad else health(total) if total.rps else "idle"
            sub = f"{eps} endpoint{'s' if eps != 1 else ''}" + (f", {bad} out" if bad else "")
            if total.rps:
                sub += f" · {rps(total.rps)}"
            kind, link = "service", f"/services/{u(n)}"
        inner = (
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="8"/>'
            f'<text x="{x + 10}" y="{y + 19}" class="name">{e(_short(n))}</text>'
            f'<text x="{x + 10}" y="{y + 36}" class="sub">{e(sub)}</text>'
        )
        node = f'<g class="node {kind} {cls}" data-name="{e(n)}"><title>{e(n)}</title>{inner}</g>'
        out.append(f'<a href="{link}">{node}</a>' if link else node)
    out.append(
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>'
    )
    out.append("</svg>")
    return "".join(out)


def page_graph(view: MeshView) -> str:
    services = view.services()
    edges = view.edges()
    drawn = len(services) + len({a for a, _ in edges}) <= MAX_DRAWN
    body = (
        graph_svg(view, services, edges)
        if drawn
        else f'<p class="empty">{len(services)} services: too many to draw; the table lists every edge.</p>'
    )
    if not services and not edges:
        body = '<p class="empty">No services yet: register one, or run <code>gmesh demo --keep</code>.</p>'
    rows = []
    for (a, b), rate in sorted(edges.items(), key=lambda item: (-item[1].rps, item[0])):
        s = rate.summary()
        target = f'<a href="/services/{u(b)}">{e(b)}</a>'
        rows.append(
            f'<tr class="edge-row {health(rate)}" data-from="{e(a)}" data-to="{e(b)}" '
            f'data-rps="{s["rps"]}" data-success="{s["successRate"]}" data-p99="{s["p99Ms"]}">'
            f"<td>{e(a)}</td><td>{target}</td><td>{rps(rate.rps)}</td>"
            f"<td>{pct(s['successRate'])}</td><td>{ms(s['p99Ms'])}</td></tr>"
        )
    return (
        f'<h1>Service graph</h1><p class="hint">Calls over the last {10:.0f} s, from what every proxy '
        "and gmesh:/// channel publishes. A caller nobody named (a plain client through a proxy) "
        "shows as that proxy.</p>"
        f'<div class="graph-box">{body}</div><h2>Edges</h2>'
        + table(["CALLER", "SERVICE", "REQUESTS", "SUCCESS", "P99"], rows, cls="edges", empty="no calls")
    )


# ------------------------------------------------------------------------------- service


def _labels(labels: Mapping[str, str]) -> str:
    return " ".join(f'<span class="label">{e(k)}={e(v)}</span>' for k, v in sorted(labels.items())) or "-"


def _yaml(doc: Any) -> str:
    return f'<pre class="yaml">{e(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))}</pre>'


def _signals_rows(groups: Mapping[str, Rate], link: bool = False) -> list[str]:
    out = []
    for name, rate in sorted(groups.items(), key=lambda item: (-item[1].rps, item[0])):
        s = rate.summary()
        out.append(
            f'<tr class="{health(rate)}" data-name="{e(name)}" data-rps="{s["rps"]}">'
            f"<td>{e(name or '-')}</td><td>{rps(rate.rps)}</td><td>{pct(s['successRate'])}</td>"
            f"<td>{ms(s['p99Ms'])}</td><td>{s['calls']}</td></tr>"
        )
    return out


def _live(state: Mapping[str, Any] | None) -> str:
    """The live state of a global rate limit or a quota, as a small table."""
    if not state:
        return ""
    if "processes" in state:
        rows = [
            f"<tr><td>{e(p)}</td><td>{demand:.1f}/s</td><td>{share:.1f}/s</td></tr>"
            for p, demand, share in state["processes"]
        ]
        return '<p class="hint">Now, per process (demand and the share it may admit):</p>' + table(
            ["PROCESS", "DEMAND", "SHARE"], rows, empty="no process has called it lately"
        )
    rows = [
        f"<tr><td>{e(key)}</td><td>{used}</td><td>{max(state['limit'] - used, 0)}</td></tr>"
        for key, used in state["used"]
    ]
    more = f" (the {len(rows)} most used of {state['keys']} keys)" if state["keys"] > len(rows) else ""
    return (
        f'<p class="hint">This window ends in {e(ago(state["endsIn"]))}; tokens taken{more} '
        "(processes hold some: they count as used):</p>"
        + table(["KEY", "USED", "LEFT"], rows, cls="quota", empty="no calls counted in this window")
    )


def page_service(view: MeshView, name: str, live: Mapping[str, Any] | None = None) -> str:
    snapshot = view.snapshot
    if not snapshot.has_service(name) and name not in view.services():
        return f'<h1>{e(name)}</h1><p class="empty">No service {e(name)} in this mesh.</p>'
    total = view.total(name)
    s = total.summary()
    head = (
        f'<h1>{e(name)}</h1><p class="stats {health(total)}">{rps(total.rps)} · success '
        f"{pct(s['successRate'])} · p99 {ms(s['p99Ms'])} (last 10 s)</p>"
    )
    views = view.endpoint_views.get(name, {})
    endpoints = snapshot.endpoints_of(name)
    rows = []
    for ep in endpoints:
        v = views.get(ep.address)
        state = v.state if v is not None else "not called"
        success = v.success_rate if v is not None else None
        cls = {"healthy": "ok", "not called": "idle"}.get(state, "bad")
        rows.append(
            f'<tr class="endpoint {cls}" data-address="{e(ep.address)}" data-state="{e(state)}">'
            f"<td>{e(ep.address)}</td><td>{_labels(ep.labels)}</td><td>{e(ep.zone or '-')}</td>"
            f'<td>{ep.weight}</td><td class="state">{e(state)}</td>'
            f"<td>{v.inflight if v else 0}</td><td>{ms(v.ewma_ms) if v and v.seen_by else '-'}</td>"
            f"<td>{pct(success)}</td></tr>"
        )
    gone = [v for a, v in sorted(views.items()) if a not in {ep.address for ep in endpoints} and v.seen_by]
    for v in gone:  # still called by someone though no longer registered
        rows.append(
            f'<tr class="endpoint bad" data-address="{e(v.address)}" data-state="deregistered">'
            f'<td>{e(v.address)}</td><td>-</td><td>-</td><td>-</td><td class="state">deregistered'
            f" ({e(v.state)})</td><td>{v.inflight}</td><td>{ms(v.ewma_ms)}</td>"
            f"<td>{pct(v.success_rate)}</td></tr>"
        )
    eps = table(
        ["ADDRESS", "LABELS", "ZONE", "WEIGHT", "STATE", "IN FLIGHT", "EWMA", "SUCCESS (10 s)"],
        rows,
        cls="endpoints",
        empty="no endpoints registered",
    )
    service = snapshot.resource("Service", name)
    subsets = ""
    settings = ""
    if service is not None:
        spec: Any = service.spec
        subset_rows = []
        for subset, labels in sorted(spec.subsets.items()):
            members = sum(1 for ep in endpoints if all(ep.labels.get(k) == v for k, v in labels.items()))
            subset_rows.append(f"<tr><td>{e(subset)}</td><td>{_labels(labels)}</td><td>{members}</td></tr>")
        subsets = "<h2>Subsets</h2>" + table(["SUBSET", "LABELS", "ENDPOINTS"], subset_rows, empty="none")
        doc = service.document()["spec"]
        doc.pop("subsets", None)
        settings = "<h2>Balancer and resilience</h2>" + (
            _yaml(doc) if doc else '<p class="empty">defaults</p>'
        )
    attached = []
    for resource in view.attached(name):
        rules = _route(resource) if resource.kind == "Route" else _live((live or {}).get(resource.ref))
        attached.append(
            f'<details open data-key="{e(resource.ref)}">'
            f'<summary><a href="/config/{u(resource.kind)}/{u(resource.name)}">'
            f"{e(resource.kind)}/{e(resource.name)}</a></summary>{rules}"
            f"{_yaml(resource.document()['spec'])}</details>"
        )
    policy = "<h2>Route, limits and policies</h2>" + ("".join(attached) or '<p class="empty">none</p>')
    methods = table(
        ["METHOD", "REQUESTS", "SUCCESS", "P99", "CALLS"],
        _signals_rows(view.grouped(name, 4)),
        empty="no calls",
    )
    backends = table(
        ["BACKEND", "REQUESTS", "SUCCESS", "P99", "CALLS"],
        _signals_rows(view.grouped(name, 3)),
        empty="no calls",
    )
    callers = table(
        ["CALLER", "REQUESTS", "SUCCESS", "P99", "CALLS"],
        _signals_rows(view.grouped(name, 5)),
        empty="no calls",
    )
    return (
        head
        + f"<h2>Endpoints ({len(endpoints)})</h2>"
        + eps
        + subsets
        + settings
        + policy
        + "<h2>Methods</h2>"
        + methods
        + "<h2>Backends</h2>"
        + backends
        + "<h2>Callers</h2>"
        + callers
    )


def _route(resource: Any) -> str:
    rows = []
    for rule in resource.spec.rules:
        match = rule.match.model_dump(mode="json", by_alias=True, exclude_none=True) if rule.match else {}
        backends = ", ".join(
            f"{e((b.service or resource.spec.service) + ('/' + b.subset if b.subset else ''))} {b.weight}%"
            for b in rule.backends
        )
        shown = yaml.safe_dump(match, default_flow_style=True).strip()
        rows.append(f"<tr><td>{e(rule.name)}</td><td><code>{e(shown)}</code></td><td>{backends}</td></tr>")
    return table(["RULE", "MATCH", "BACKENDS"], rows, cls="route")


# ------------------------------------------------------------------------------ rollouts


def _spark(points: Sequence[tuple[float, float | None]], cls: str, top: float) -> str:
    w, h = 360, 60
    if not points or top <= 0:
        return ""
    t0, t1 = points[0][0], max(points[-1][0], points[0][0] + 1)
    coords = [
        f"{(t - t0) / (t1 - t0) * w:.1f},{h - (v / top) * (h - 4) - 2:.1f}"
        for t, v in points
        if v is not None
    ]
    return f'<polyline class="{cls}" points="{" ".join(coords)}"/>' if len(coords) > 1 else ""


def _finite(value: Any) -> float | None:
    """A number written by someone else, if it is one we can print."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if abs(number) < 1e15 else None  # NaN and infinities fail this too


def _trend(view: MeshView, service: str) -> str:
    trend = list(view.trends.get(service, ()))
    if len(trend) < 2:
        return '<p class="empty">collecting…</p>'
    charts = []
    for metric, title, scale in (("errors", "error rate", 1.0), ("p99Ms", "p99", 1.0)):
        series = {}
        for role in ("canary", "baseline"):
            pts: list[tuple[float, float | None]] = []
            for t, point in trend:
                s = point[role]
                if metric == "errors":
                    rate = s["successRate"]
                    pts.append((t, None if rate is None else 1 - rate))
                else:
                    pts.append((t, s["p99Ms"]))
            series[role] = pts
        values = [v for pts in series.values() for _, v in pts if v is not None]
        top = max(max(values, default=0.0) * 1.1 * scale, 0.01 if metric == "errors" else 1.0)
        label = pct(top) if metric == "errors" else ms(top)
        charts.append(
            f'<figure><figcaption>{e(title)} (top {e(label)}): <span class="canary">canary</span> vs '
            f'<span class="baseline">baseline</span></figcaption><svg class="spark" width="360" height="60" '
            f'viewBox="0 0 360 60">{_spark(series["baseline"], "baseline", top)}'
            f"{_spark(series['canary'], 'canary', top)}</svg></figure>"
        )
    return '<div class="trends">' + "".join(charts) + "</div>"


def _rollout(view: MeshView, state: RolloutState, writes: bool, token: str) -> str:
    running = state.phase in ("running", "abort-requested")
    w = state.weight if running else (100 if state.phase == "promoted" else 0)
    m = state.measured or {}

    def measured(role: str) -> str:
        s = m.get(role)
        calls = _finite(s.get("calls")) if isinstance(s, dict) else None
        if not isinstance(s, dict) or not calls:
            return "no calls"
        rate, p99 = _finite(s.get("error_rate")), _finite(s.get("p99"))
        return f"{calls:.0f} calls, {pct(rate)} errors, p99 {ms(None if p99 is None else p99 * 1000)}"

    if running and writes:
        action = (
            f'<form method="post" action="/rollouts/{u(state.service)}/abort">'
            f'<input type="hidden" name="token" value="{e(token)}">'
            f'<button type="submit" class="danger">Abort: all traffic back to {e(state.baseline)}</button>'
            "</form>"
        )
    elif running:
        action = '<p class="hint">Start the dashboard with --allow-writes to abort from here.</p>'
    else:
        action = ""
    history = "".join(f"<li>{e(line)}</li>" for line in reversed(state.history[-12:]))
    return (
        f'<section class="rollout {e(state.phase)}" data-service="{e(state.service)}" '
        f'data-phase="{e(state.phase)}" data-step="{state.step + 1}">'
        f'<h2><a href="/services/{u(state.service)}">{e(state.service)}</a>: '
        f'{e(state.baseline)} → {e(state.canary)} <span class="phase">{e(state.phase)}</span></h2>'
        f'<p class="step">step {state.step + 1} of {len(state.steps)} '
        f"({e(', '.join(f'{s}%' for s in state.steps))}): {e(state.canary)} {w}%, "
        f"{e(state.baseline)} {100 - w}% · every {state.interval:g}s · {e(state.thresholds.describe())}</p>"
        f'<svg class="bar" width="360" height="14" viewBox="0 0 360 14"><rect class="all" width="360" '
        f'height="14" rx="7"/><rect class="canary-w" data-weight="{w}" width="{w * 3.6:.0f}" height="14" '
        f'rx="7"/></svg>'
        f"<p>Last step measured: canary {measured('canary')}; baseline {measured('baseline')}</p>"
        f'<p class="reason">{e(state.reason or "running")}</p>'
        f"{_trend(view, state.service) if running else ''}{action}"
        f'<details data-key="history:{e(state.service)}"><summary>history</summary><ul>{history}</ul>'
        "</details></section>"
    )


def page_rollouts(view: MeshView, writes: bool, token: str) -> str:
    states = sorted(
        view.rollouts.values(), key=lambda s: (s.phase not in ("running", "abort-requested"), s.service)
    )
    parts = []
    for state in states:
        try:
            parts.append(_rollout(view, state, writes, token))
        except Exception:  # a state nobody foresaw must not take the page with it
            parts.append(f'<section class="rollout"><h2>{e(state.service)}</h2><p class="empty">This '
                         "rollout's stored state could not be shown.</p></section>")  # fmt: skip
    body = "".join(parts)
    return "<h1>Rollouts</h1>" + (
        body
        or '<p class="empty">No rollouts. Start one with <code>gmesh rollout canary SERVICE …</code>.</p>'
    )


# -------------------------------------------------------------------------------- config


def page_config(view: MeshView) -> str:
    rows = []
    for kind, by_name in sorted(view.snapshot.resources.items()):
        for name, resource in sorted(by_name.items()):
            rows.append(
                f'<tr><td>{e(kind)}</td><td><a href="/config/{u(kind)}/{u(name)}">{e(name)}</a></td>'
                f"<td>{resource.revision}</td></tr>"
            )
    invalid = "".join(
        f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in sorted(view.catalog.invalid.items())
    )
    return (
        f'<h1>Config</h1><p class="hint">Revision {view.snapshot.revision} of the config and endpoints.</p>'
        + table(["KIND", "NAME", "REVISION"], rows, cls="resources", empty="no config resources")
        + (f'<h2>Refused (invalid)</h2><ul class="bad">{invalid}</ul>' if invalid else "")
    )


def _document(raw: bytes) -> str:
    import json

    try:
        return yaml.safe_dump(json.loads(raw), sort_keys=False, default_flow_style=False)
    except ValueError:
        return raw.decode("utf-8", "replace")


async def page_resource(view: MeshView, kind: str, name: str, a: int | None, b: int | None) -> str:
    versions, older = await view.history(kind, name)
    title = f"<h1>{e(kind)}/{e(name)}</h1>"
    if not versions:
        return title + '<p class="empty">Not in the store (deleted, or never applied).</p>'
    by_rev = {kv.mod_revision: kv for kv in versions}
    new = by_rev.get(b or 0, versions[0])
    old = by_rev.get(a or 0) if a else (versions[1] if len(versions) > 1 else None)
    items = []
    for kv in versions:
        mark = " (current)" if kv is versions[0] else ""
        items.append(
            f'<li class="revision" data-revision="{kv.mod_revision}">revision {kv.mod_revision}{mark}'
            + (
                f' · <a href="?a={kv.mod_revision}&amp;b={new.mod_revision}">diff to {new.mod_revision}</a>'
                if kv.mod_revision != new.mod_revision
                else ""
            )
            + "</li>"
        )
    history = f'<h2>History</h2><ul class="history">{"".join(items)}</ul>' + (
        f'<p class="hint">Older revisions not shown: beyond the {HISTORY} newest, or compacted by etcd.</p>'
        if older
        else ""
    )
    if old is not None:
        lines = difflib.unified_diff(
            _document(old.value).splitlines(),
            _document(new.value).splitlines(),
            f"revision {old.mod_revision}",
            f"revision {new.mod_revision}",
            lineterm="",
        )
        diff = "".join(
            f'<span class="{"add" if line.startswith("+") else "del" if line.startswith("-") else "ctx"}">'
            f"{e(line)}</span>\n"
            for line in lines
        )
        diff_html = (
            f"<h2>Diff: revision {old.mod_revision} → {new.mod_revision}</h2>"
            f'<pre class="diff" data-a="{old.mod_revision}" data-b="{new.mod_revision}">'
            f"{diff or 'identical'}</pre>"
        )
    else:
        diff_html = '<p class="hint">Only one revision so far: nothing to compare.</p>'
    return (
        title
        + f'<h2>Revision {new.mod_revision}</h2><pre class="yaml">{e(_document(new.value))}</pre>'
        + diff_html
        + history
    )


# ------------------------------------------------------------------------------- proxies


def page_proxies(view: MeshView) -> str:
    now = time.time()
    revision = view.latest_change()
    rows = []
    for process, record in sorted(
        view.processes.items(), key=lambda item: (str(item[1].get("role")), item[0])
    ):
        rev = int(record.get("revision", 0))
        behind = view.behind(process, now)
        sync = f"behind ({rev} < {revision})" if behind else "in sync"
        services = ", ".join(record["services"][:8]) or "-"
        rows.append(
            f'<tr class="process {"bad" if behind else "ok"}" data-role="{e(record.get("role", ""))}">'
            f"<td>{e(record.get('role', '?'))}</td><td>{e(record.get('id', process))}</td>"
            f"<td>{e(record.get('host', ''))}</td><td>{e(record.get('pid', ''))}</td>"
            f"<td>{rev}</td><td>{e(sync)}</td><td>{e(ago(now - record['startedAt']))}</td>"
            f"<td>{e(services)}</td></tr>"
        )
    proxies = []
    for pid, record in sorted(view.proxies.items()):
        cells = [
            pid,
            record.get("address", ""),
            record.get("admin") or "-",
            record.get("metrics") or "-",
            record.get("identity") or "-",
            "serving" if record.get("serving") else "starting",
        ]
        proxies.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    return (
        f'<h1>Proxies and channel processes</h1><p class="hint">The newest config or endpoint change is '
        f"at revision {revision}; a process still serving an older one after a few seconds is behind.</p>"
        + table(
            ["ROLE", "ID", "HOST", "PID", "REVISION", "SYNC", "UPTIME", "CALLING"],
            rows,
            cls="processes",
            empty="no running proxies or channel processes",
        )
        + "<h2>Proxy listeners</h2>"
        + table(["PROXY", "LISTEN", "ADMIN", "METRICS", "IDENTITY", "STATE"], proxies, empty="no proxies")
    )


def not_found(path: str) -> str:
    return f'<h1>Not found</h1><p class="empty">Nothing at {e(path)}.</p>'
