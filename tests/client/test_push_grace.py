"""How long a client waits for a pushed step's answer before sending the step itself."""

from __future__ import annotations

import pytest
from volunteer.scheduler.routing import RouteHop

from volunteer.client.hops import PUSH_GRACE_FACTOR, PUSH_GRACE_MIN_S, Hop


def _hop(start: int, end: int, step_s: float | None) -> Hop:
    hop = Hop(RouteHop("peer", start, end), stream=None)  # type: ignore[arg-type]  # unused
    hop.step_s = step_s
    return hop


def test_a_fresh_hop_is_judged_by_the_previous_hop_per_block() -> None:
    # The previous hop took 40 ms over 15 blocks; this one has 30 and no step yet.
    grace = _hop(15, 45, None).push_grace_s(_hop(0, 15, 0.040))
    assert grace == pytest.approx(PUSH_GRACE_FACTOR * 0.080)


def test_a_hop_slower_than_that_estimate_is_judged_by_its_own_last_step() -> None:
    grace = _hop(15, 30, 0.200).push_grace_s(_hop(0, 15, 0.040))
    assert grace == pytest.approx(PUSH_GRACE_FACTOR * 0.200)


def test_the_grace_has_a_floor() -> None:
    assert _hop(1, 2, 0.001).push_grace_s(_hop(0, 1, 0.001)) == PUSH_GRACE_MIN_S
