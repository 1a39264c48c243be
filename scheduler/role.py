"""Serve or train: what a volunteer's machine should do for the swarm.

Serving comes first while the inference swarm cannot run the model at all (a block
with no server) or its weakest block is below the speed people need; otherwise, when
the volunteer allows training and a training swarm is under way, the machine joins it;
otherwise it serves. The volunteer's own choices always bound the answer.

`volunteer profile` reports the role; a daemon started with `--train` acts on it
(`volunteer.daemon.training_service`).
"""

from __future__ import annotations

import dataclasses
import enum

WANTED_BLOCK_TPS = 10.0
"""Below this at its weakest block the swarm needs servers before trainers: a chat
reads fluently at about 10 tokens/s."""


class RoleKind(str, enum.Enum):
    SERVE = "serve"
    TRAIN = "train"
    IDLE = "idle"


@dataclasses.dataclass(frozen=True)
class RoleInputs:
    is_serving_allowed: bool
    is_training_allowed: bool
    weakest_block_tps: float
    """The inference swarm's weakest block (tokens/s); 0 when a block has no server."""
    wanted_block_tps: float
    """The speed the inference swarm should reach before volunteers go to training."""
    has_training_swarm: bool


@dataclasses.dataclass(frozen=True)
class RoleDecision:
    kind: RoleKind
    reason: str


def choose_role(inputs: RoleInputs) -> RoleDecision:
    if not inputs.is_serving_allowed and not inputs.is_training_allowed:
        return RoleDecision(RoleKind.IDLE, "the volunteer allowed neither serving nor training")
    if not inputs.is_training_allowed:
        return RoleDecision(RoleKind.SERVE, "serving is the only role the volunteer allowed")
    if not inputs.is_serving_allowed:
        if inputs.has_training_swarm:
            return RoleDecision(RoleKind.TRAIN, "training is the only role the volunteer allowed")
        return RoleDecision(RoleKind.IDLE, "training is allowed but no training swarm runs")
    if inputs.weakest_block_tps <= 0:
        return RoleDecision(RoleKind.SERVE, "a block of the model has no server")
    if inputs.weakest_block_tps < inputs.wanted_block_tps:
        return RoleDecision(
            RoleKind.SERVE,
            f"the swarm's weakest block runs {inputs.weakest_block_tps:.3g} tokens/s, below "
            f"the {inputs.wanted_block_tps:.3g} wanted",
        )
    if inputs.has_training_swarm:
        return RoleDecision(
            RoleKind.TRAIN,
            f"inference is served well enough ({inputs.weakest_block_tps:.3g} tokens/s at the "
            f"weakest block) and a training swarm needs peers",
        )
    return RoleDecision(RoleKind.SERVE, "no training swarm runs")
