"""Serve or train, within what the volunteer allows."""

from __future__ import annotations

from volunteer.scheduler.role import RoleInputs, RoleKind, choose_role


def _inputs(**changes: object) -> RoleInputs:
    base = {
        "is_serving_allowed": True,
        "is_training_allowed": True,
        "weakest_block_tps": 50.0,
        "wanted_block_tps": 20.0,
        "has_training_swarm": True,
    }
    return RoleInputs(**{**base, **changes})  # type: ignore[arg-type]


def test_a_hole_or_a_slow_swarm_gets_a_server_first() -> None:
    assert choose_role(_inputs(weakest_block_tps=0.0)).kind is RoleKind.SERVE
    slow = choose_role(_inputs(weakest_block_tps=5.0))
    assert slow.kind is RoleKind.SERVE and "below" in slow.reason


def test_a_well_served_swarm_sends_volunteers_to_training() -> None:
    assert choose_role(_inputs()).kind is RoleKind.TRAIN
    assert choose_role(_inputs(has_training_swarm=False)).kind is RoleKind.SERVE


def test_the_volunteers_choices_bound_the_role() -> None:
    assert choose_role(_inputs(is_training_allowed=False)).kind is RoleKind.SERVE
    only_train = _inputs(is_serving_allowed=False, weakest_block_tps=0.0)
    assert choose_role(only_train).kind is RoleKind.TRAIN
    nothing = _inputs(is_serving_allowed=False, has_training_swarm=False)
    assert choose_role(nothing).kind is RoleKind.IDLE
    neither = _inputs(is_serving_allowed=False, is_training_allowed=False)
    assert choose_role(neither).kind is RoleKind.IDLE
