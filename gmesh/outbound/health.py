"""Active health checks: grpc.health.v1 `Check` from this process to every endpoint of the services
in use whose `Service` has `healthCheck`, over the pooled endpoint connections.

An endpoint leaves the pickers after `unhealthyThreshold` failed checks in a row (a check
fails when it times out, errors, or answers anything but SERVING) and comes back after
`healthyThreshold` passing ones. Each check waits `interval` plus a random jitter, so many
proxies do not probe in lockstep. Services nobody calls are never checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from gmesh.balancer.state import EndpointStates

if TYPE_CHECKING:
    from gmesh.outbound.pool import EndpointConn

log = logging.getLogger(__name__)

_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthChecks:
    """One checking task per (service, endpoint) in use with a `healthCheck` policy."""

    def __init__(self, states: EndpointStates, conn_of: Callable[[str], EndpointConn | None]) -> None:
        self.states = states
        self._conn_of = conn_of
        self._tasks: dict[tuple[str, str], tuple[Any, asyncio.Task[None]]] = {}

    def sync(self, service: str, spec: Any, addresses: Iterable[str]) -> None:
        """Check `service`'s endpoints at `addresses` per `spec` (None: stop checking them)."""
        wanted = {(service, a) for a in addresses} if spec is not None else set()
        for key in [
            k for k, (s, _) in self._tasks.items() if k[0] == service and (k not in wanted or s != spec)
        ]:
            _, task = self._tasks.pop(key)
            task.cancel()
            if key not in wanted:
                self._release(key)
        loop = asyncio.get_running_loop()
        for key in wanted:
            if key not in self._tasks:
                task = loop.create_task(self._check_forever(*key, spec), name=f"gmesh-health {key[1]}")
                self._tasks[key] = (spec, task)

    def stop(self, service: str) -> None:
        """`service` is no longer in use: no more checks."""
        for key in [k for k in self._tasks if k[0] == service]:
            _, task = self._tasks.pop(key)
            task.cancel()

    def checking(self) -> int:
        return len(self._tasks)

    def _release(self, key: tuple[str, str]) -> None:
        state = self.states.states.get(key)
        if state is not None and not state.healthy:
            state.healthy = True  # no longer checked: no longer held out
            state.hc_failures = state.hc_successes = 0
            self.states.changed(key[0])

    async def _check_forever(self, service: str, address: str, spec: Any) -> None:
        state = self.states.get(service, address)
        request = health_pb2.HealthCheckRequest(service=spec.service).SerializeToString()
        # Start at a random point of the first interval: proxies started together spread out.
        await asyncio.sleep(random.random() * spec.interval)
        while True:
            ok = await self._check(address, request, spec.timeout)
            if ok is None:
                pass  # no connection to check over (yet): neither a pass nor a failure
            elif ok:
                state.hc_successes += 1
                state.hc_failures = 0
                if not state.healthy and state.hc_successes >= spec.healthy_threshold:
                    state.healthy = True
                    log.info("%s of %s is healthy again", address, service)
                    self.states.changed(service)
            else:
                state.hc_failures += 1
                state.hc_successes = 0
                if state.healthy and state.hc_failures >= spec.unhealthy_threshold:
                    state.healthy = False
                    log.warning(
                        "%s of %s failed %d health checks: out of picks", address, service, state.hc_failures
                    )
                    self.states.changed(service)
            await asyncio.sleep(spec.interval * (1 + random.random() * spec.jitter_percent / 100))

    async def _check(self, address: str, request: bytes, timeout: float) -> bool | None:
        conn = self._conn_of(address)
        if conn is None:
            return None
        try:
            raw = await conn.unary_unary(_CHECK)(request, timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        except (grpc.aio.UsageError, RuntimeError):  # the connection closed meanwhile
            return None
        return bool(health_pb2.HealthCheckResponse.FromString(raw).status == _SERVING)

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
