"""The dashboard's web server: a Starlette app served by uvicorn inside gmesh's own event loop.

Pages are server-rendered (`gmesh.dashboard.render`); each open page holds one server-sent-event
stream (`/events?page=...`) that gets its `<main>` again whenever the model changed and the HTML
differs (at most once a second from the stats poll, at once on a config change). Safe by default:
loopback unless told otherwise, a Host-header check (no DNS rebinding), a Content Security Policy
with no inline script or style, and writes (aborting a rollout) only with `--allow-writes`, from
a form that carries this process's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from gmesh.dashboard import render
from gmesh.dashboard.model import MeshView
from gmesh.errors import AddressInUse, GmeshError

log = logging.getLogger(__name__)

#: an idle event stream sends a comment this often (proxies and browsers keep it open)
KEEPALIVE = 15.0
#: the shortest time between two renders of one stream's page
MIN_GAP = 0.5
#: the largest form body read (the abort form holds one token)
MAX_FORM = 4096

NAV = (("/", "Graph"), ("/rollouts", "Rollouts"), ("/config", "Config"), ("/proxies", "Proxies"))

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _static(name: str) -> bytes:
    return resources.files("gmesh.dashboard").joinpath("static", name).read_bytes()


class Dashboard:
    """The app over one `MeshView`. `allow_writes`: the abort button works."""

    def __init__(self, view: MeshView, *, allow_writes: bool = False, hosts: set[str] | None = None) -> None:
        self.view = view
        self.allow_writes = allow_writes
        self.token = secrets.token_urlsafe(24)
        #: Host header names accepted besides IP literals and localhost (the --listen host)
        self.hosts = {h.lower() for h in (hosts or set())} | {"localhost"}
        self.stopping = asyncio.Event()
        #: open event streams now, and pages rendered for them (tests, the cost statement)
        self.streams = 0
        self.renders = 0
        #: (path, query) -> (model version, <main> HTML): streams of one page share a render
        self._rendered: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[int, str]] = {}
        self._js, self._css = _static("app.js"), _static("app.css")
        self.routes = Starlette(
            routes=[
                Route("/", self.page),
                Route("/services/{name}", self.page),
                Route("/rollouts", self.page),
                Route("/rollouts/{service}/abort", self.abort, methods=["POST"]),
                Route("/config", self.page),
                Route("/config/{kind}/{name}", self.page),
                Route("/proxies", self.page),
                Route("/events", self.events),
                Route("/api/graph", self.api_graph),
                Route("/healthz", self.healthz),
                Route("/favicon.ico", self.no_icon),
                Route("/static/app.js", self.static_js),
                Route("/static/app.css", self.static_css),
            ],
        )
        #: what uvicorn serves: the guard outside everything, so error pages get its headers too
        self.app = _Guard(self.routes, self)

    # -- rendering ---------------------------------------------------------------------------

    async def shared(self, path: str, query: dict[str, str], version: int) -> str:
        """`main()` of a page at model `version`, rendered once however many streams show it."""
        key = (path, tuple(sorted(query.items())))
        found = self._rendered.get(key)
        if found is not None and found[0] == version and not self.view.error:
            return found[1]
        _, html = await self.main(path, query)
        if len(self._rendered) > 256:
            self._rendered.clear()  # bounded: pages are few, made-up query strings are not
        self._rendered[key] = (version, html)
        return html

    async def main(self, path: str, query: dict[str, str]) -> tuple[str, str]:
        """(title, inner HTML of <main>) of the page at `path`."""
        view = self.view
        self.renders += 1
        parts = [p for p in path.split("/") if p]
        now = time.time()
        if not parts:
            title, body = "graph", render.page_graph(view)
        elif parts[0] == "services" and len(parts) == 2:
            try:
                live = await view.limit_state(parts[1])
            except GmeshError:  # etcd away: the banner says so; the rest of the page still shows
                live = {}
            title, body = parts[1], render.page_service(view, parts[1], live)
        elif parts == ["rollouts"]:
            title, body = "rollouts", render.page_rollouts(view, self.allow_writes, self.token)
        elif parts == ["config"]:
            title, body = "config", render.page_config(view)
        elif parts[0] == "config" and len(parts) == 3:
            a, b = _int(query.get("a")), _int(query.get("b"))
            title = f"{parts[1]}/{parts[2]}"
            try:
                body = await render.page_resource(view, parts[1], parts[2], a, b)
            except GmeshError as exc:  # etcd away: the banner says so; keep the page readable
                body = f'<h1>{render.e(title)}</h1><p class="empty">History unavailable: {render.e(exc)}</p>'
        elif parts == ["proxies"]:
            title, body = "proxies", render.page_proxies(view)
        else:
            title, body = "not found", render.not_found(path)
        return title, render.banner(view, now) + body

    def shell(self, path: str, title: str, main: str) -> str:
        here = "/" + path.strip("/").split("/")[0] if path.strip("/") else "/"
        current = ' class="here"'
        nav = "".join(f'<a href="{href}"{current if href == here else ""}>{label}</a>' for href, label in NAV)
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>gmesh · {render.e(title)}</title>"
            '<link rel="stylesheet" href="/static/app.css"></head><body>'
            f'<header><a class="brand" href="/">gmesh</a><nav>{nav}</nav>'
            '<span id="live" class="live">connecting…</span></header>'
            f'<main id="main">{main}</main><script src="/static/app.js"></script></body></html>'
        )

    # -- endpoints ---------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        path = request.url.path
        title, main = await self.main(path, dict(request.query_params))
        status = 404 if title == "not found" else 200
        return HTMLResponse(self.shell(path, title, main), status_code=status)

    async def events(self, request: Request) -> Response:
        page = request.query_params.get("page", "/")
        path, _, query_text = page.partition("?")
        query = {k: v for k, _, v in (pair.partition("=") for pair in query_text.split("&") if pair)}

        async def stream() -> AsyncIterator[str]:
            self.streams += 1
            try:
                yield "retry: 1000\n\n"
                sent = ""
                last = 0.0
                while not self.stopping.is_set():
                    # at most two renders a second, however fast the catalog changes
                    await asyncio.sleep(max(last + MIN_GAP - time.monotonic(), 0))
                    last = time.monotonic()
                    version = self.view.version
                    main = await self.shared(path, query, version)
                    if main != sent:
                        sent = main
                        # EventSource ends a line at \n, \r or both: text from etcd may hold a \r
                        lines = main.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                        data = "".join(f"data: {line}\n" for line in lines)
                        yield f"event: main\n{data}\n"
                    await _first(self.view.wait(version, KEEPALIVE), self.stopping.wait())
                    if self.view.version == version and not self.stopping.is_set():
                        yield ": keepalive\n\n"
            finally:
                self.streams -= 1

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def abort(self, request: Request) -> Response:
        if not self.allow_writes:
            return Response("writes are off: start gmesh dashboard with --allow-writes\n", status_code=403)
        # a urlencoded form of one field: parsed here (Starlette's form parser needs python-multipart)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return Response("form too large\n", status_code=413)
        form = parse_qs(body.decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].encode()
        if not secrets.compare_digest(given, self.token.encode()):
            return Response("bad or missing form token\n", status_code=403)
        service = request.path_params["service"]
        from gmesh.rollout.controller import abort

        view = self.view
        try:
            message = await abort(view.store, view.keys, view.kinds, service)
        except GmeshError as exc:
            message = f"abort {service}: {exc}"
        view.notice = (message, time.time() + 15)
        view.touch()  # pages show the notice now, the rollout's new phase after the next read
        return RedirectResponse("/rollouts", status_code=303)

    async def api_graph(self, request: Request) -> Response:
        edges = [
            {"caller": a, "service": b, **rate.summary()}
            for (a, b), rate in sorted(self.view.edges().items())
        ]
        return JSONResponse(
            {"services": self.view.services(), "edges": edges, "etcdError": self.view.error or None}
        )

    async def healthz(self, request: Request) -> Response:
        view = self.view
        return JSONResponse(
            {"ok": True, "streams": self.streams, "renders": self.renders, "version": view.version,
             "etcdReads": view.reads, "etcdError": view.error or None}
        )  # fmt: skip

    async def no_icon(self, request: Request) -> Response:
        return Response(status_code=204)

    async def static_js(self, request: Request) -> Response:
        return Response(self._js, media_type="text/javascript", headers={"Cache-Control": "max-age=60"})

    async def static_css(self, request: Request) -> Response:
        return Response(self._css, media_type="text/css", headers={"Cache-Control": "max-age=60"})

    def host_allowed(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


class _Guard:
    """Refuses requests whose Host is a DNS name not ours (a rebinding page reaching the loopback
    port), and sets the security headers on every answer."""

    def __init__(self, app: Any, dashboard: Dashboard) -> None:
        self.app, self.dashboard = app, dashboard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def secured(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        if not self.dashboard.host_allowed(headers.get("host", "")):
            await Response("unknown Host\n", status_code=421)(scope, receive, secured)
            return
        await self.app(scope, receive, secured)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


async def _first(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Server(uvicorn.Server):
    """uvicorn inside a running event loop: gmesh handles signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DashboardServer:
    """Serves a `Dashboard` on `host:port` (port 0: any free one) in the current event loop."""

    def __init__(self, dashboard: Dashboard, host: str, port: int) -> None:
        self.dashboard = dashboard
        config = uvicorn.Config(
            dashboard.app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            access_log=False,
            timeout_graceful_shutdown=2,  # a stream to a client that stopped reading must not hold us
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self.host = host
        self._port = port
        self.port = 0

    async def start(self) -> None:
        # bound here, not by uvicorn: a busy port is a clear error, not uvicorn's sys.exit
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            raise AddressInUse(
                f"the dashboard cannot listen on {self.host}:{self._port}: {exc.strerror}"
            ) from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(
            self.server.serve(sockets=[sock]), name="gmesh-dashboard"
        )
        deadline = time.monotonic() + 30
        while not self.server.started:  # uvicorn says so by a flag only
            if self._task.done():
                self._task.result()
                raise GmeshError("the dashboard's server stopped while starting")
            if time.monotonic() > deadline:
                raise GmeshError("the dashboard's server did not start within 30 s")
            await asyncio.sleep(0.02)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def stop(self) -> None:
        self.dashboard.stopping.set()  # event streams end, so the server need not wait for them
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def serve(
    view: MeshView,
    listen: str,
    *,
    allow_writes: bool = False,
    hosts: Iterable[str] = (),
    on_ready: Callable[[DashboardServer], None] | None = None,
    until: Awaitable[Any] | None = None,
) -> None:
    """Start `view`, serve it on `listen` until `until` completes (or forever), then stop.
    `hosts`: host names browsers may use besides IP addresses, localhost and the listen host."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise GmeshError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:15080") from None
    server = DashboardServer(Dashboard(view, allow_writes=allow_writes, hosts={host, *hosts}), host, port)
    try:
        await view.start()
        await server.start()
        if on_ready is not None:
            on_ready(server)
        if until is None:
            await asyncio.Event().wait()
        else:
            await until
    finally:
        await server.stop()
        await view.close()
