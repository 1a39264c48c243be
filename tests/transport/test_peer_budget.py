"""Per-peer token buckets: a burst, a refill rate, and a bounded table of peers."""

from __future__ import annotations

import pytest

from volunteer.transport.peer_budget import PeerBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    budget = PeerBudget(rate=2.0, burst=5.0, clock=clock)
    assert all(budget.take("a") for _ in range(5))
    assert not budget.take("a") and budget.refused == 1
    clock.now += 1.0  # two tokens back
    assert budget.take("a", 2.0)
    assert not budget.take("a")
    clock.now += 100.0  # never more than the burst
    assert budget.take("a", 5.0) and not budget.take("a")


def test_one_peers_flood_leaves_others_their_budget() -> None:
    budget = PeerBudget(rate=1.0, burst=3.0, clock=Clock())
    assert [budget.take("flood") for _ in range(10)].count(True) == 3
    assert budget.take("honest", 3.0)


def test_a_request_costing_more_than_is_left_spends_nothing() -> None:
    budget = PeerBudget(rate=1.0, burst=4.0, clock=Clock())
    assert budget.take("a", 3.0)
    assert not budget.take("a", 2.0)
    assert budget.take("a", 1.0)


def test_the_table_of_peers_is_bounded_and_forgets_the_quietest() -> None:
    clock = Clock()
    budget = PeerBudget(rate=1.0, burst=2.0, max_peers=3, clock=clock)
    budget.take("old", 2.0)
    for peer in ("b", "c", "old", "d"):  # "old" heard again: "b" is now the quietest
        budget.take(peer)
    assert len(budget) == 3
    assert not budget.take("old")  # still remembered as spent
    assert budget.take("b", 2.0)  # forgotten: a full bucket again


@pytest.mark.parametrize("bad", [{"rate": 0.0}, {"burst": -1.0}, {"max_peers": 0}])
def test_nonsense_limits_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        PeerBudget(**{"rate": 1.0, "burst": 1.0, **bad})
