"""`gmesh dashboard` in headless Chromium (Debian's `chromium`, driven by playwright) against a
running mesh: real etcd, real Echo servers, a real proxy and channel, the dashboard as its own
process. Screenshots of each page go to .artifacts/dashboard/ (or $GMESH_TEST_ARTIFACTS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from conftest import Mesh, start_proxy
from playwright.async_api import Browser, Page, async_playwright

import gmesh.aio
from gmesh.discovery.endpoint import Endpoint
from gmesh.discovery.keys import MeshKeys
from gmesh.errors import StoreUnavailable
from gmesh.rollout import controller as rc
from gmesh.store.etcd import EtcdConfig, Put, Store
from gmesh.testing.etcd import EtcdMember
from gmesh.v1 import echo_pb2, echo_pb2_grpc

GMESH = [sys.executable, "-P", "-m", "gmesh.cli"]
CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("GMESH_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / ".artifacts")


def shot_path(name: str) -> str:
    folder = ARTIFACTS / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{name}.png")


@contextlib.asynccontextmanager
async def dashboard(env: dict[str, str], *args: str) -> AsyncIterator[str]:
    """`gmesh dashboard` as users run it, on a free port; its URL."""
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "dashboard", "--listen", "127.0.0.1:0", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while not (
                found := re.search(rb"http://127\.0\.0\.1:\d+/", line := await proc.stdout.readline())
            ):
                assert line, "gmesh dashboard exited: " + (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        yield found.group().decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM, "the dashboard tests need Debian's chromium (tox installs it: apt-get install chromium)"
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=["--disable-dev-shm-usage"])
        yield launched
        await launched.close()


async def new_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A page at `url`, and the JavaScript errors it raises (must stay empty)."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    response = await page.goto(url)
    assert response is not None and response.status == 200, url
    return page, errors


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> tuple[Any, float]:
    """Poll `check()` (with a deadline) until it returns something truthy; (value, seconds)."""
    started = time.monotonic()
    while True:
        value = await check()
        if value:
            return value, time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.05)


async def attr(page: Page, selector: str, name: str) -> str | None:
    found = page.locator(selector)
    if await found.count() == 0:
        return None
    return await found.first.get_attribute(name)


class Load:
    """Calls at a steady rate (bounded: stops when told, or after `limit` seconds)."""

    def __init__(self, call: Callable[[], Awaitable[Any]], rate: float, limit: float = 120) -> None:
        self.call, self.rate, self.limit = call, rate, limit
        self.done: list[float] = []
        self.failed = 0
        self.started = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < self.limit:
            n += 1
            try:
                await self.call()
                self.done.append(time.monotonic())
            except grpc.aio.AioRpcError:
                self.failed += 1
            await asyncio.sleep(max(started + n / self.rate - time.monotonic(), 0))

    def rate_over(self, seconds: float) -> float:
        now = time.monotonic()
        return sum(1 for t in self.done if t > now - seconds) / seconds

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_the_dashboard_shows_a_known_workload_live(
    browser: Browser, mesh: Mesh, etcd_server: EtcdMember, mesh_keys: MeshKeys, gmesh_env: dict[str, str],
    tmp_path: Path, config_kinds: Any,
) -> None:  # fmt: skip
    proxy = await start_proxy(etcd_server, mesh_keys, tmp_path)
    await proxy.catalog.wait_for(lambda s: len(s.endpoints_of("orders")) == 3, timeout=10)
    request = echo_pb2.EchoRequest(message="hi")
    loads: list[Load] = []
    async with (
        gmesh.aio.channel(
            "gmesh:///orders", etcd=etcd_server.url, prefix=mesh_keys.prefix, caller_labels={"app": "loadgen"}
        ) as channel,
        grpc.aio.insecure_channel(proxy.address) as plain,
        dashboard(gmesh_env, "--allow-writes") as url,
    ):
        via_channel, via_proxy = echo_pb2_grpc.EchoStub(channel), echo_pb2_grpc.EchoStub(plain)
        loads = [
            Load(lambda: via_channel.Unary(request, timeout=5), 20.0),
            Load(lambda: via_proxy.Unary(request, timeout=5), 5.0),
        ]
        page, errors = await new_page(browser, url)
        try:
            # -- the graph: both callers, the numbers of the known workload (±1 call/s)
            loadgen = 'tr.edge-row[data-from="loadgen"][data-to="orders"]'
            proxied = f'tr.edge-row[data-from="proxy:{proxy.id}"][data-to="orders"]'

            async def edges_match() -> bool:
                a, b = await attr(page, loadgen, "data-rps"), await attr(page, proxied, "data-rps")
                full = all(time.monotonic() - load.started > 11 for load in loads)  # a whole window
                return (
                    full and a is not None and b is not None
                    and abs(float(a) - loads[0].rate_over(10)) <= 1
                    and abs(float(b) - loads[1].rate_over(10)) <= 1
                )  # fmt: skip

            await until(edges_match, 40, "edges at the workload's rates")
            for _ in range(3):  # and they stay right while the page updates itself
                await asyncio.sleep(1.5)
                assert await edges_match(), (
                    await attr(page, loadgen, "data-rps"), loads[0].rate_over(10),
                    await attr(page, proxied, "data-rps"), loads[1].rate_over(10),
                )  # fmt: skip
            shown = [await attr(page, loadgen, "data-rps"), await attr(page, proxied, "data-rps")]
            sent = [f"{load.rate_over(10):.1f}" for load in loads]
            print(f"edges (loadgen, proxy): shown {shown}/s, sent {sent}/s")  # for the record: pytest -rP
            assert await page.locator('svg.graph g.edge[data-from="loadgen"][data-to="orders"]').count() == 1
            assert await page.locator('svg.graph g.node[data-name="orders"]').count() == 1
            assert await page.locator(f'svg.graph g.node[data-name="proxy:{proxy.id}"]').count() == 1
            label = await page.locator('svg.graph g.edge[data-from="loadgen"] text').text_content() or ""
            assert re.fullmatch(r"\d+\.\d/s · 100\.00% · p99 [\d.]+(ms|µs)", label), label
            await page.screenshot(path=shot_path("graph"), full_page=True)

            # -- a config change shows on the open service page, without a reload, within 2 s
            await page.goto(url + "services/orders")
            await page.locator("table.endpoints tr.endpoint").first.wait_for()
            assert await page.locator("table.endpoints tr.endpoint").count() == 3
            await mesh.put("Route", "orders", {"service": "orders", "rules": [
                {"name": "default", "backends": [{"subset": "v1", "weight": 100}]}]})  # fmt: skip
            await until(lambda: page.locator("table.route").count(), 5, "the route table")
            started = time.monotonic()
            split = [{"subset": "v1", "weight": 70}, {"subset": "v2", "weight": 30}]
            await mesh.put(
                "Route", "orders", {"service": "orders", "rules": [{"name": "default", "backends": split}]}
            )

            async def shows_split() -> bool:
                return "orders/v2 30%" in await page.locator("table.route").inner_text()

            await until(shows_split, 5, "the new weights on the page")
            took = time.monotonic() - started
            print(f"a Route change on the open page after {took:.2f}s")
            assert took <= 2.0, "the page took longer than 2 s to show the change"

            # -- config: the Route's two revisions and their diff
            config, _ = await new_page(browser, url + "config/Route/orders")
            assert await config.locator("li.revision").count() == 2
            dels = " ".join(await config.locator("pre.diff .del").all_inner_texts())
            adds = " ".join(await config.locator("pre.diff .add").all_inner_texts())
            assert "weight: 100" in dels and "weight: 70" in adds and "weight: 30" in adds, (dels, adds)
            await config.screenshot(path=shot_path("config"), full_page=True)
            await config.close()

            # -- a running canary shows its step; the page's abort button rolls it back
            state = rc.RolloutState("orders", "v1", "v2", [10, 50, 100], 60.0, rc.Thresholds(min_calls=5))
            canary = asyncio.get_running_loop().create_task(
                rc.run_canary(mesh.store, mesh_keys, config_kinds, state)
            )
            rollouts, _ = await new_page(browser, url + "rollouts")
            section = 'section.rollout[data-service="orders"]'
            await until(lambda: attr(rollouts, section, "data-phase"), 10, "the rollout on the page")
            assert await attr(rollouts, section, "data-step") == "1"
            assert await attr(rollouts, section, "data-phase") == "running"
            assert "step 1 of 3" in await rollouts.locator(f"{section} p.step").inner_text()
            assert await attr(rollouts, f"{section} rect.canary-w", "data-weight") == "10"
            await rollouts.screenshot(path=shot_path("rollouts"), full_page=True)
            await rollouts.locator(f"{section} button.danger").click()
            final = await asyncio.wait_for(canary, 10)
            assert final.phase == rc.ABORTED
            await until(lambda: _phase(rollouts, section), 5, "aborted on the page")
            await rollouts.close()

            # -- an endpoint dies (its record stays until the lease runs out): out within 5 s
            v2 = mesh.servers["v2"]
            await v2.stop(None)
            killed = time.monotonic()
            row = f'table.endpoints tr.endpoint[data-address="{v2.address}"]'

            async def out() -> str | None:
                state = await attr(page, row, "data-state")
                return state if state in ("unreachable", "ejected", "unhealthy") else None

            state_seen, _ = await until(out, 10, "the killed endpoint out")
            took = time.monotonic() - killed
            print(f"the killed endpoint {state_seen} on the page after {took:.2f}s")
            assert took <= 5.0, f"{state_seen} only after {took:.1f}s"
            await page.screenshot(path=shot_path("service"), full_page=True)

            # -- proxies: the proxy and the channel process (this one) are in sync
            proxies, _ = await new_page(browser, url + "proxies")
            rows = proxies.locator("table.processes tr.process")
            assert await rows.count() >= 1
            assert "in sync" in await rows.first.inner_text()
            await proxies.screenshot(path=shot_path("proxies"), full_page=True)
            await proxies.close()
            assert errors == []
        finally:
            for load in loads:
                await load.stop()
            await page.close()
    await proxy.stop(0)


async def _phase(page: Page, section: str) -> bool:
    return await attr(page, section, "data-phase") == rc.ABORTED


#: markup that becomes an element (#pwned) if any text reaches the page unescaped, and a script
HOSTILE = '<b id="pwned">x</b><script>window.__xss=1</script>'


async def test_the_page_survives_bad_data_and_etcd_going_away(
    browser: Browser, etcd_member: EtcdMember, tmp_path: Path
) -> None:
    keys = MeshKeys("/gmesh-dash-bad/")
    env = {**os.environ, "GMESH_ETCD": etcd_member.url, "GMESH_PREFIX": keys.prefix,
           "GMESH_DATA_DIR": str(tmp_path / "data")}  # fmt: skip
    longest = "s" * 63
    async with await Store.connect(EtcdConfig.parse(etcd_member.url)) as store:
        for name, annotations in (("empty", {"note": HOSTILE}), (longest, {}), ("big", {})):
            doc = {"kind": "Service", "metadata": {"name": name, "annotations": annotations}, "spec": {}}
            await store.put(keys.config("Service", name), json.dumps(doc).encode())
        records = [
            Put(keys.endpoint("big", f"10.0.{i // 250}.{i % 250}:80"),
                Endpoint("big", f"10.0.{i // 250}.{i % 250}:80", labels={"n": str(i)}).to_json())
            for i in range(500)
        ]  # fmt: skip
        for start in range(0, len(records), 100):
            await store.txn((), records[start : start + 100])
        await store.put(keys.endpoint(longest, "127.0.0.1:1"), Endpoint(longest, "127.0.0.1:1").to_json())
        hostile = json.loads(Endpoint("big", "127.0.0.9:9").to_json())
        hostile["labels"] = {"team": HOSTILE}
        await store.put(keys.endpoint("big", "127.0.0.9:9"), json.dumps(hostile).encode())
        # garbage and wrong types where processes publish
        await store.put(keys.stats("big", "junk"), b"{not json")
        await store.put(keys.processes_root + "junk", b"[1, 2")
        await store.put(
            keys.process("typo"), json.dumps({"revision": "12", "startedAt": "x", "services": 3}).encode()
        )
        # a running rollout whose names and reasons are markup, and one whose steps are
        state = rc.RolloutState("big", "v1", HOSTILE, [10, 100], 30.0, rc.Thresholds(), reason=HOSTILE)
        state.history = [HOSTILE]
        await store.put(keys.rollout("big"), state.to_json())
        await store.put(keys.rollout("bad"), json.dumps({**json.loads(state.to_json()), "service": "bad",
                                                         "steps": [HOSTILE]}).encode())  # fmt: skip

        async def evil_process() -> None:
            """Publishes like a real process, once a second, with markup for names and junk endpoints."""
            calls = 0
            while True:
                calls += 5
                names = {"caller": HOSTILE, "door": "channel", "route": HOSTILE, "method": HOSTILE}
                row = {
                    **names,
                    "backend": "big",
                    "codes": {"OK": calls},
                    "buckets": {"3": calls},
                    "sum": 0.01,
                }
                junk = [{"address": HOSTILE, "inflight": "x", "ewmaMs": [1], "healthy": "no"}, 5]
                doc = {"at": time.time(), "calls": [row], "endpoints": junk}
                with contextlib.suppress(StoreUnavailable):  # etcd is stopped for a while below
                    await store.put(keys.stats("big", "evil"), json.dumps(doc).encode())
                await asyncio.sleep(1.0)

        publisher = asyncio.get_running_loop().create_task(evil_process())
        try:
            async with dashboard(env) as url:
                pages = {}
                for name, path in (("graph", ""), ("big", "services/big"), ("empty", "services/empty"),
                                   ("longest", f"services/{longest}"), ("config", "config"),
                                   ("empty-yaml", "config/Service/empty"), ("rollouts", "rollouts"),
                                   ("proxies", "proxies")):  # fmt: skip
                    page, errors = await new_page(browser, url + path)
                    pages[name] = page
                    assert errors == [], (name, errors)
                graph = pages["graph"]
                hostile_edge = graph.locator("svg.graph g.edge", has_text="window.__xss")
                await until(lambda: hostile_edge.count(), 15, "the hostile caller's edge")
                assert await graph.locator("tr.edge-row td").first.inner_text() == HOSTILE  # text, not markup
                assert await graph.locator(f'svg.graph g.node[data-name="{longest}"]').count() == 1
                big = pages["big"]
                await until(lambda: _count(big, "table.endpoints tr.endpoint"), 10, "500 endpoints")
                registered = 'table.endpoints tr.endpoint:not([data-state="deregistered"])'
                assert await big.locator(registered).count() == 501
                assert HOSTILE in await big.locator("table.endpoints").inner_text()  # the label, as text
                assert "no endpoints registered" in await pages["empty"].locator("main").inner_text()
                assert HOSTILE in await pages["empty-yaml"].locator("pre.yaml").inner_text()
                assert await pages["longest"].locator("h1").inner_text() == longest
                rollouts = pages["rollouts"]
                assert await rollouts.locator("section.rollout").count() == 1  # the bad one skipped
                assert (
                    HOSTILE in await rollouts.locator('section.rollout[data-service="big"] h2').inner_text()
                )
                assert HOSTILE in await rollouts.locator("p.reason").inner_text()
                updated = "document.getElementById('main').dataset.updated"
                for name, page in pages.items():  # every page has had a live update (innerHTML) too
                    await until(lambda page=page: page.evaluate(updated), 10, f"a live update of {name}")
                for name, page in pages.items():
                    await page.screenshot(path=shot_path(f"bad-{name}"), full_page=True)
                    assert await page.locator("#pwned").count() == 0, name  # no markup from etcd, ever
                    assert await page.evaluate("window.__xss") is None, name

                # etcd goes away: every page says so and keeps what it showed; back: so is the page
                etcd_member.stop()
                stopped = time.monotonic()
                await until(lambda: _count(graph, "#etcd-down"), 20, "the etcd banner")
                assert await graph.locator(f'svg.graph g.node[data-name="{longest}"]').count() == 1
                await graph.screenshot(path=shot_path("etcd-down"), full_page=True)
                etcd_member.start()
                await until(lambda: _none(graph, "#etcd-down"), 30, "the banner gone once etcd is back")
                await store.put(keys.config("Service", "newcomer"), json.dumps(
                    {"kind": "Service", "metadata": {"name": "newcomer"}, "spec": {}}).encode())  # fmt: skip
                await until(lambda: _count(graph, 'svg.graph g.node[data-name="newcomer"]'), 20, "live again")
                assert time.monotonic() - stopped < 60
                for page in pages.values():
                    await page.close()
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher


async def _count(page: Page, selector: str) -> int:
    return await page.locator(selector).count()


async def _none(page: Page, selector: str) -> bool:
    return await page.locator(selector).count() == 0


@pytest.mark.slow
async def test_demo_keep_serves_the_dashboard_until_ctrl_c(browser: Browser, tmp_path: Path) -> None:
    from gmesh.store.embedded import EmbeddedEtcd

    env = {k: v for k, v in os.environ.items() if k not in ("GMESH_ETCD", "GMESH_PREFIX")}
    env["GMESH_DATA_DIR"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *GMESH, "demo", "--keep", "--dashboard-listen", "127.0.0.1:0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        output = b""
        async with asyncio.timeout(90):
            while not (found := re.search(rb"dashboard: (http://127\.0\.0\.1:\d+/)", output)):
                line = await proc.stdout.readline()
                assert line, output.decode()
                output += line
        url = found.group(1).decode()
        page, errors = await new_page(browser, url)

        async def both_callers() -> bool:
            rates = {}
            for row in await page.locator("tr.edge-row").all():
                rates[await row.get_attribute("data-from")] = float(await row.get_attribute("data-rps") or 0)
            front = rates.pop("frontend", 0.0)
            proxied = [r for name, r in rates.items() if name and name.startswith("proxy:")]
            return abs(front - 8) <= 1 and len(proxied) == 1 and abs(proxied[0] - 4) <= 1

        await until(both_callers, 40, "frontend and the proxy calling orders")
        await page.screenshot(path=shot_path("demo-graph"), full_page=True)
        await page.goto(url + "rollouts")
        await until(lambda: attr(page, 'section.rollout[data-phase="running"]', "data-step"), 30, "a canary")
        await page.screenshot(path=shot_path("demo-rollouts"), full_page=True)
        assert errors == []
        await page.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode in (0, 130), rest
    assert "removing the demo's servers and keys" in rest[0].decode()
    assert EmbeddedEtcd(tmp_path).status() is None  # the etcd it started is stopped again
