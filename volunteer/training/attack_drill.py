"""A Byzantine training peer on purpose: the share it sends in place of its gradient,
as the `VOLUNTEER_FAULTS` training attacks ask (`volunteer.faults`), for drills and
tests only. The peer says so in its log and status.
"""

from __future__ import annotations

import random

import torch

from volunteer.faults import Fault
from volunteer.training import attacks

RANDOM_DIRECTION_SEED = 0x5EED
"""The direction random-direction attackers agree on."""
RANDOM_DIRECTION_GAIN = 20.0
"""How much longer than an honest gradient the random vector is."""
NEEDS_HONEST = ("ipm", "alie")
"""Attacks that wait for the honest peers' shares first (the omniscient attacker)."""


class AttackDrill:
    """The training attacks one peer commits; `rng` decides which steps they strike."""

    def __init__(self, faults: tuple[Fault, ...], *, seed: int = 0) -> None:
        self.faults = faults
        self._rng = random.Random(seed)
        stale = [fault.steps for fault in faults if fault.kind == "stale"]
        self._staleness = attacks.Staleness(max(stale)) if stale else None
        self._striking: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.faults)

    def begin_step(self) -> None:
        """Draws which attacks strike in this step."""
        self._striking = {fault.kind for fault in self.faults if self._rng.random() < fault.rate}

    def flips_labels(self) -> bool:
        return "label-flip" in self._striking

    def passes_wrong(self, answer: str) -> bool:
        """Whether this step's `answer` ("activations" or "input-grads") is to be wrong."""
        return f"wrong-{answer}" in self._striking

    def noise_seed(self) -> int:
        return self._rng.randrange(1 << 31)

    def waits_for_honest(self) -> bool:
        return any(kind in self._striking for kind in NEEDS_HONEST)

    def share(self, gradient: torch.Tensor, honest: list[torch.Tensor], peers: int) -> torch.Tensor:
        """What to send instead of `gradient`, given the other peers' shares that came."""
        sent = gradient
        if self._staleness is not None:
            # Kept every step, so that "STEPS ago" means steps, not strikes.
            old = self._staleness.delay(gradient)
            sent = old if "stale" in self._striking else sent
        if "sign-flip" in self._striking:
            sent = attacks.sign_flip(sent)
        if "random-direction" in self._striking:
            norm = RANDOM_DIRECTION_GAIN * float(gradient.norm()) + 1e-3
            sent = attacks.random_direction(sent, seed=RANDOM_DIRECTION_SEED, norm=norm)
        if self.waits_for_honest():
            known = torch.stack([gradient, *honest])
            mean = known.mean(0)
            if "ipm" in self._striking:
                sent = attacks.inner_product_manipulation(mean)
            if "alie" in self._striking:
                spread = known.std(0) if len(known) > 1 else torch.zeros_like(mean)
                sent = attacks.a_little_is_enough(mean, spread, peers=max(peers, 2), hostile=1)
        return sent
