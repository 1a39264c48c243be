"""The penalty box: a few free strikes, then bans that double, strikes that fade, and a
bounded memory (its clock is the test's, so no test waits)."""

from __future__ import annotations

from volunteer.server.penalty_box import PenaltyBox


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_past_its_free_strikes_a_peer_is_kept_out_each_time_for_longer() -> None:
    clock = Clock()
    box = PenaltyBox(free_strikes=3, first_ban_s=10.0, max_ban_s=25.0, clock=clock)
    assert [box.strike("p") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert box.banned_for("p") == 0.0
    assert box.strike("p") == 10.0
    assert box.banned_for("p") == 10.0
    assert box.strike("p") == 0.0  # kept out already: no longer ban for trying meanwhile
    clock.now += 10.0
    assert box.banned_for("p") == 0.0
    assert max(box.strike("p") for _ in range(4)) == 20.0
    clock.now += 20.0
    assert max(box.strike("p") for _ in range(4)) == 25.0  # at most max_ban_s
    assert box.banned_for("someone else") == 0.0


def test_strikes_fade_so_rare_failures_never_ban() -> None:
    clock = Clock()
    box = PenaltyBox(free_strikes=3, strike_half_life_s=60.0, clock=clock)
    for _ in range(100):  # one failure every two minutes, for hours
        assert box.strike("honest server") == 0.0
        clock.now += 120.0
    assert box.banned_for("honest server") == 0.0


def test_its_memory_is_bounded_and_forgets_the_peers_not_kept_out_first() -> None:
    clock = Clock()
    box = PenaltyBox(free_strikes=1, first_ban_s=100.0, max_peers=8, clock=clock)
    box.strike("banned")
    assert box.strike("banned") == 100.0
    for index in range(50):  # identities with one strike each: none is kept out
        box.strike(f"sybil {index}")
        clock.now += 0.01
        assert len(box) <= 8
    assert box.banned_for("banned") > 0
