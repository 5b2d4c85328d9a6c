"""Weighted round robin: exact shares, spread out, drained endpoints skipped."""

from __future__ import annotations

import collections

from gmesh.balancer import RoundRobin
from gmesh.chain.call import Call
from gmesh.discovery.endpoint import Endpoint


async def _noop(call: Call) -> None:
    return None


CALL = Call("/a.B/C", (), None, "s", _noop)


def eps(*weights: int) -> list[Endpoint]:
    return [Endpoint("s", f"127.0.0.1:{1000 + i}", weight=w) for i, w in enumerate(weights)]


def picks(picker: RoundRobin, n: int) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        ep = picker.pick(CALL)
        assert ep is not None
        out[ep.address] += 1
    return out


def test_equal_weights_cycle_exactly() -> None:
    assert set(picks(RoundRobin(eps(1, 1, 1)), 300).values()) == {100}


def test_unequal_weights_get_exact_shares_interleaved() -> None:
    picker = RoundRobin(eps(3, 1))
    counts = picks(picker, 400)
    assert counts == {"127.0.0.1:1000": 300, "127.0.0.1:1001": 100}
    window = [picker.pick(CALL) for _ in range(8)]
    assert sum(1 for e in window if e is not None and e.address == "127.0.0.1:1001") == 2  # not in a burst


def test_weight_zero_drains_and_empty_picks_none() -> None:
    assert set(picks(RoundRobin(eps(1, 0, 1)), 10)) == {"127.0.0.1:1000", "127.0.0.1:1002"}
    assert RoundRobin(eps(0)).pick(CALL) is None
    assert RoundRobin([]).pick(CALL) is None


def test_pickers_start_at_random_places() -> None:
    firsts = {RoundRobin(eps(1, 1, 1, 1)).pick(CALL).address for _ in range(200)}  # type: ignore[union-attr]
    assert len(firsts) == 4
