"""Micro-benchmark of the rate-limit check on the hot path (target: <= 2 µs per call).

    python bench/ratelimit.py [--calls 1000000]

Times `RateLimiter.check` (what the LIMIT-phase filter and the inbound proxy run per call) on a
`Call` as the proxy makes it, for: one total limit; one limit per `metadata:x-api-key` over
10,000 keys; one `key: caller` limit; a limit on other methods (does not apply); and the
shared buckets of `gmesh proxy --workers N` (memory-mapped, flock). Every call is admitted
(rates far above what is offered), so it measures the check, not the refusal. Prints ns per
call, best of 5 runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

from gmesh.chain.call import Call, Caller
from gmesh.config.kinds import Resource
from gmesh.ratelimit.limits import RateLimiter, limits_of
from gmesh.ratelimit.spec import RateLimitSpec

METHOD = "/orders.v1.Orders/Get"


async def _forward(call: Call[Any]) -> None:
    return None


def limiter(**spec: Any) -> RateLimiter:
    parsed = RateLimitSpec.model_validate(
        {"service": "orders", "rate": "10000000/s", "burst": 10_000_000, **spec}
    )
    resource = Resource("RateLimit", "bench", parsed)  # type: ignore[call-arg]
    states: dict[str, Any] = {}

    def kept(key: str, make: Any) -> Any:
        return states.setdefault(key, make())

    return RateLimiter(limits_of({"bench": resource}, "orders", kept))


def calls(n_keys: int) -> list[Call[Any]]:
    out = []
    for i in range(n_keys):
        metadata = (("x-request-id", "abc"), ("x-api-key", f"key-{i}"), ("user-agent", "bench"))
        out.append(
            Call(
                METHOD,
                metadata,
                None,
                "orders",
                _forward,
                caller=Caller(peer=f"ipv4:127.0.0.{i % 250}:5{i % 1000:04d}"),
            )
        )
    return out


def measure(check: Any, pool: list[Call[Any]], n: int) -> float:
    """ns per check, best of 5 runs of `n` checks."""
    runs = []
    size = len(pool)
    for _ in range(5):
        started = time.perf_counter()
        for i in range(n):
            check(pool[i % size])
        runs.append((time.perf_counter() - started) / n * 1e9)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.calls
    one = calls(1)
    many = calls(10_000)
    baseline = measure(lambda call: None, one, n)
    rows = [
        ("total (no key)", limiter(), one),
        ("per metadata:x-api-key, 10,000 keys", limiter(key="metadata:x-api-key"), many),
        ("per caller (address), 250 callers", limiter(key="caller"), many),
        ("other methods only (not applied)", limiter(methods=["/payments.v1.Payments/*"]), one),
    ]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as shared:
        os.environ["GMESH_SHARED_LIMITS"] = shared
        rows.append(("total, shared by --workers (mmap + flock)", limiter(), one))
        rows.append(("per metadata:x-api-key, shared by --workers", limiter(key="metadata:x-api-key"), many))
        del os.environ["GMESH_SHARED_LIMITS"]
        print(
            f"rate-limit check, ns per call (best of 5 x {n:,}; loop overhead {baseline:.0f} ns subtracted)"
        )
        results = []
        for name, rl, pool in rows:
            ns = measure(rl.check, pool, n) - baseline
            results.append(ns)
            print(f"  {name:48s} {ns:7.0f} ns")
    print(f"median {statistics.median(results):.0f} ns; target <= 2000 ns (2 µs) per call")


if __name__ == "__main__":
    main()
