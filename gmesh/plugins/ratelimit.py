"""Built-in plugin: rate limits and quotas in the LIMIT phase (the `RateLimit` and `Quota` kinds,
gmesh/ratelimit/).

Builds nothing for a service no RateLimit names: no cost there. The buckets live in the mesh
state (`BuildContext.kept`), so a config change elsewhere never refills them.
"""

from __future__ import annotations

from collections.abc import Callable

from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Phase
from gmesh.config.kinds import KindRegistry
from gmesh.hookspecs import hookimpl
from gmesh.ratelimit.limits import LimitState, RateLimiter, limits_of
from gmesh.ratelimit.quota import KIND as QUOTA_KIND
from gmesh.ratelimit.quota import QUOTA, QuotaChecker, QuotaState, quotas_of
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


class QuotaFactory:
    name = "quota"
    phase = Phase.LIMIT

    def build(self, ctx: BuildContext) -> Filter | None:
        resources = ctx.resources(QUOTA_KIND)
        used: set[str] = set()

        def kept(key: str, make: Callable[[], QuotaState]) -> QuotaState:
            used.add(key)
            return ctx.kept(key, make)

        shares = ctx.mesh.shares  # the mesh's store and keys
        store, keys = (shares.store, shares.keys) if shares is not None else (None, None)
        checks = quotas_of(resources, ctx.service, kept, store, keys) if resources else []
        ctx.mesh.prune(ctx.service, "quota:", used)
        return QuotaChecker(checks) if checks else None


@hookimpl(trylast=True)
def gmesh_register_config_kinds(kinds: KindRegistry) -> None:
    kinds.add(RATE_LIMIT)
    kinds.add(QUOTA)


@hookimpl(trylast=True)
def gmesh_filter_factories() -> list[FilterFactory]:
    return [RateLimitFactory(), QuotaFactory()]
