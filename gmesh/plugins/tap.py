"""Built-in plugin: `tap` — hands live calls of a service to the taps watching it (`gmesh tap`).

Built for every service (OBSERVE phase, so it sees calls that later filters reject), so a tap
can start at any time without a recompile. With nobody watching, a call costs one dict
lookup. A watched call becomes an event when it ends: method, request metadata (after the
plugins' redaction), code, duration, endpoint, route, backend, attempts, message counts and,
when the tap asks, the request and response bodies of unary calls (cut to the tap's limit,
after the plugins' body redaction). Events go to each tap's bounded queue (`gmesh.stats.tap`).
"""

from __future__ import annotations

import time
from typing import Any

from gmesh.chain.call import Call, Door
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.discovery.endpoint import MethodKind
from gmesh.errors import outcome_of
from gmesh.hookspecs import hookimpl
from gmesh.stats.accesslog import timestamp
from gmesh.stats.edits import TelemetryEdits, report_failure
from gmesh.stats.metrics import backend_label
from gmesh.stats.tap import Tap, TapHub, cut

_DOORS = {Door.PROXY: "proxy", Door.CHANNEL: "channel"}


class TapCalls:
    """Turns the calls taps want into events."""

    __slots__ = ("edits", "hub", "service")

    def __init__(self, service: str, hub: TapHub, edits: TelemetryEdits) -> None:
        self.service = service
        self.hub = hub
        self.edits = edits

    async def __call__(self, call: Call[Any], next: Handler, /) -> Any:
        if self.service not in self.hub.by_service:
            return await next(call)
        taps = list(self.hub.watching(self.service, call.method))
        if not taps:
            return await next(call)
        started, clock = time.time(), time.perf_counter()
        metadata = call.metadata  # as the caller sent it
        result: Any = None
        code = "OK"
        try:
            result = await next(call)
            return result
        except BaseException as exc:
            code = outcome_of(exc, call.committed, call.deadline).code.name
            raise
        finally:
            try:
                self._emit(taps, call, metadata, code, result, started, time.perf_counter() - clock)
            except Exception:
                report_failure("tap event")

    def _emit(
        self,
        taps: list[Tap],
        call: Call[Any],
        metadata: Any,
        code: str,
        result: Any,
        started: float,
        seconds: float,
    ) -> None:
        unary = call.kind is MethodKind.UNARY
        rule = call.route
        shown = self.edits.shown(self.service, list(metadata))
        event: dict[str, Any] = {
            "time": timestamp(started),
            "door": _DOORS[call.door],
            "service": self.service,
            "method": call.method,
            "metadata": [(k, v if isinstance(v, str) else "<binary>") for k, v in shown],
            "code": code,
            "duration_ms": round(seconds * 1000, 3),
            "endpoint": "" if call.endpoint is None else call.endpoint.address,
            "route": "" if rule is None else rule.name,
            "backend": backend_label(self.service, call.backend),
            "attempts": call.attempts or 1,
            "caller": call.caller.identity or call.caller.peer,
            "request_messages": 1 if unary else call.sent,
            "response_messages": (1 if code == "OK" else 0) if unary else call.received,
        }
        bodies: tuple[bytes | None, bytes | None] | None = None
        for tap in taps:
            copy = dict(event)
            if tap.bodies and unary:
                if bodies is None:
                    bodies = self._bodies(call, result)
                request, cut_request = cut(bodies[0], tap.max_body)
                response, cut_response = cut(bodies[1], tap.max_body)
                copy.update(
                    request=request,
                    response=response,
                    truncated=cut_request or cut_response,
                    request_truncated=cut_request,
                    response_truncated=cut_response,
                )
            tap.offer(copy)

    def _bodies(self, call: Call[Any], result: Any) -> tuple[bytes | None, bytes | None]:
        down = call.downstream
        request = down.request_bytes() if hasattr(down, "request_bytes") else None
        response = (
            down.response_bytes(result) if result is not None and hasattr(down, "response_bytes") else None
        )
        for redact in self.edits.redact_body:
            if request is not None:
                request = redact(self.service, call.method, "request", request)
            if response is not None:
                response = redact(self.service, call.method, "response", response)
        return request, response


class TapFactory:
    """`tap`: on every service (it costs a dict lookup per call while nobody watches)."""

    name = "tap"
    phase = Phase.OBSERVE

    def build(self, ctx: BuildContext) -> Filter | None:
        return TapCalls(ctx.service, ctx.mesh.taps, ctx.mesh.edits)


@hookimpl(tryfirst=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [TapFactory()]
