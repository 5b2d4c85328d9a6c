"""Active health checks: grpc.health.v1 `Check` from this process to every endpoint of services
whose Service kind has `healthCheck`, on the pooled endpoint channels.

An endpoint leaves the pickers after `unhealthyThreshold` failed checks in a row (a check
fails when it times out, errors, or answers anything but SERVING) and comes back after
`healthyThreshold` passing ones. Each check waits `interval` plus a random jitter, so many
proxies do not probe in lockstep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from gmesh.balancer.state import Registry
from gmesh.channel.endpoint import EndpointPool
from gmesh.discovery.catalog import MeshSnapshot

log = logging.getLogger(__name__)

_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING


class HealthChecks:
    """One checking task per (service, endpoint) with a `healthCheck` policy; kept in step with snapshots."""

    def __init__(self, pool: EndpointPool, registry: Registry, scope: str | None = None) -> None:
        self.pool = pool
        self.registry = registry
        #: None: every service (a proxy); else the one service a channel calls, and the
        #: services its Route sends calls to
        self.scope = scope
        self._tasks: dict[tuple[str, str], tuple[Any, asyncio.Task[None]]] = {}

    def _services(self, snapshot: MeshSnapshot) -> list[str]:
        if self.scope is None:
            return snapshot.services()
        services = {self.scope}
        for route in snapshot.resources.get("Route", {}).values():
            if getattr(route.spec, "service", None) == self.scope:
                for rule in route.spec.rules:  # type: ignore[attr-defined]
                    services.update(b.service for b in rule.backends if b.service)
        return sorted(services)

    def sync(self, snapshot: MeshSnapshot) -> None:
        """Check what `snapshot` asks for; one checker per endpoint in the process (the first
        to ask owns it; when it closes, the next sync elsewhere takes over)."""
        wanted: dict[tuple[str, str], Any] = {}
        owners = self.registry.health_owners
        for service in self._services(snapshot):
            resource = snapshot.resource("Service", service)
            spec = getattr(resource.spec, "health_check", None) if resource is not None else None
            if spec is None:
                continue
            for endpoint in snapshot.endpoints_of(service):
                key = (service, endpoint.address)
                if owners.setdefault(key, self) is self:
                    wanted[key] = spec
        for key in [k for k, (spec, _) in self._tasks.items() if wanted.get(k) != spec]:
            _, task = self._tasks.pop(key)
            task.cancel()
            if key not in wanted:
                self._release(key)
        loop = asyncio.get_running_loop()
        for key, spec in wanted.items():
            if key not in self._tasks:
                task = loop.create_task(self._check_forever(*key, spec), name=f"gmesh-health {key[1]}")
                self._tasks[key] = (spec, task)

    def _release(self, key: tuple[str, str]) -> None:
        if self.registry.health_owners.get(key) is self:
            del self.registry.health_owners[key]
        state = self.registry.states.get(key)
        if state is not None and not state.healthy:
            state.healthy = True  # no longer checked: no longer held out
            state.hc_failures = state.hc_successes = 0
            self.registry.changed(key[0])

    async def _check_forever(self, service: str, address: str, spec: Any) -> None:
        state = self.registry.get(service, address)
        request = health_pb2.HealthCheckRequest(service=spec.service).SerializeToString()
        # Start at a random point of the first interval: proxies started together spread out.
        await asyncio.sleep(random.random() * spec.interval)
        while True:
            ok = await self._check(address, request, spec.timeout)
            if ok:
                state.hc_successes += 1
                state.hc_failures = 0
                if not state.healthy and state.hc_successes >= spec.healthy_threshold:
                    state.healthy = True
                    log.info("%s of %s is healthy again", address, service)
                    self.registry.changed(service)
            else:
                state.hc_failures += 1
                state.hc_successes = 0
                if state.healthy and state.hc_failures >= spec.unhealthy_threshold:
                    state.healthy = False
                    log.warning(
                        "%s of %s failed %d health checks: out of picks", address, service, state.hc_failures
                    )
                    self.registry.changed()
            await asyncio.sleep(spec.interval * (1 + random.random() * spec.jitter_percent / 100))

    async def _check(self, address: str, request: bytes, timeout: float) -> bool:
        try:
            raw = await self.pool.get(address).unary_unary(_CHECK)(request, timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        except (KeyError, RuntimeError):  # the endpoint left the pool meanwhile
            return False
        return bool(health_pb2.HealthCheckResponse.FromString(raw).status == _SERVING)

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        keys = list(self._tasks)
        self._tasks.clear()
        for key in keys:
            if self.registry.health_owners.get(key) is self:
                del self.registry.health_owners[key]
        if keys:
            self.registry.changed()  # other outbounds of this process take the checks over
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
