"""Built-in plugin: rate limits in the LIMIT phase (the `RateLimit` kind, gmesh/ratelimit/).

Builds nothing for a service no RateLimit names: no cost there. The buckets live in the mesh
state (`BuildContext.kept`), so a config change elsewhere never refills them.
"""

from __future__ import annotations

from collections.abc import Callable

from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Phase
from gmesh.config.kinds import KindRegistry
from gmesh.hookspecs import hookimpl
from gmesh.ratelimit.limits import LimitState, RateLimiter, limits_of
from gmesh.ratelimit.spec import KIND, RATE_LIMIT


class RateLimitFactory:
    name = "ratelimit"
    phase = Phase.LIMIT

    def build(self, ctx: BuildContext) -> Filter | None:
        resources = ctx.resources(KIND)
        used: set[str] = set()

        def kept(key: str, make: Callable[[], LimitState]) -> LimitState:
            used.add(key)
            return ctx.kept(key, make)

        limits = limits_of(resources, ctx.service, kept, ctx.mesh.shares) if resources else ()
        # buckets of limits that changed or went away are dropped with them
        ctx.mesh.prune(ctx.service, "ratelimit:", used)
        return RateLimiter(limits) if limits else None


@hookimpl(trylast=True)
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(RATE_LIMIT)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [RateLimitFactory()]
