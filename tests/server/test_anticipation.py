"""The inference steps' pace, on a clock the test moves: forward/backward work waits
after a step for the next one when it is due soon, never past the window's bound, and
never more than `max_hold_s` in a row."""

from __future__ import annotations

import pytest

from volunteer.server.anticipation import WINDOW_MARGIN, Anticipation


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _paced(gap_s: float, steps: int = 5, **bounds: float) -> tuple[Anticipation, Clock]:
    """`steps` inference steps of 10 ms, `gap_s` apart (end to next arrival)."""
    clock = Clock()
    anticipation = Anticipation(clock=clock, **bounds)
    for _ in range(steps):
        anticipation.inference_arrived()
        clock.now += 0.01
        anticipation.inference_ended()
        clock.now += gap_s
    clock.now -= gap_s  # just after the last step's end
    return anticipation, clock


def test_nothing_is_held_before_a_pace_is_known() -> None:
    clock = Clock()
    anticipation = Anticipation(clock=clock)
    assert anticipation.training_wait_s() == 0
    anticipation.inference_arrived()
    anticipation.inference_ended()
    assert anticipation.training_wait_s() == 0  # one step: no gap seen yet


def test_after_a_step_work_waits_for_the_next_one_that_is_due() -> None:
    anticipation, clock = _paced(0.04)
    assert anticipation.gap_s == pytest.approx(0.04)
    assert anticipation.training_wait_s() == pytest.approx(0.04 * WINDOW_MARGIN)
    clock.now += 0.03
    assert anticipation.training_wait_s() == pytest.approx(0.04 * WINDOW_MARGIN - 0.03)
    clock.now += 0.04  # the step is late past the window: the work goes
    assert anticipation.training_wait_s() == 0


def test_a_slow_route_is_waited_for_no_longer_than_the_window() -> None:
    anticipation, _ = _paced(0.4, max_window_s=0.25)
    assert anticipation.training_wait_s() == pytest.approx(0.25)


def test_a_chat_without_pause_holds_work_back_no_longer_than_max_hold() -> None:
    anticipation, clock = _paced(0.04, max_hold_s=0.2)
    waits = []
    for _ in range(10):  # a step every 50 ms, and work waiting all along
        waits.append(anticipation.training_wait_s())
        clock.now += 0.04
        anticipation.inference_arrived()
        clock.now += 0.01
        anticipation.inference_ended()
    assert all(wait > 0 for wait in waits[:4])
    assert waits[4] == 0  # held 200 ms in a row: one job goes
    anticipation.training_started()
    assert anticipation.training_wait_s() > 0  # and the next is held again


def test_a_pause_in_the_chat_ends_the_hold_at_the_windows_end() -> None:
    anticipation, clock = _paced(0.04)
    clock.now += 5.0  # a person typing
    assert anticipation.training_wait_s() == 0
    anticipation.inference_arrived()
    clock.now += 0.01
    anticipation.inference_ended()
    # One long gap raises the average: the window is its bound for a while.
    assert anticipation.training_wait_s() == pytest.approx(anticipation.max_window_s)


def test_a_window_of_zero_never_holds() -> None:
    anticipation, _ = _paced(0.04, max_window_s=0.0)
    assert anticipation.training_wait_s() == 0
