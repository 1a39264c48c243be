"""One hop of an inference session's route: its stream, and what was sent through it.

`volunteer.client.inference` keeps a `Hop` per server of its route: the inputs sent
(the replay history), how long its last step took (how long to wait for a pushed
step), its checks, and the work its server did (the hop's receipt).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from volunteer.client.positions import keep_before
from volunteer.client.stream_types import InferenceStreamLike
from volunteer.client.verification import HopCheck
from volunteer.scheduler.routing import RouteHop


@dataclasses.dataclass
class Hop:
    hop: RouteHop
    stream: InferenceStreamLike
    inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """Every hidden-state chunk sent to this hop, in order: the replay history."""
    length: int = 0
    """Positions in `inputs`."""
    step_s: float | None = None
    """How long this hop's last step took to answer (None: no step yet)."""
    check: HopCheck | None = None
    """This hop's checks (`volunteer.client.verification`); None: unchecked."""
    tokens: int = 0
    """Positions (batch x length) the hop's server answered: its receipt's work."""
    opened_s: float = dataclasses.field(default_factory=time.time)

    def push_grace_s(self, previous: Hop) -> float:
        """How long to wait for the answer to a step pushed here (by `previous`, which
        has just answered it) before sending the step after all.

        The step costs this hop about what it cost the previous hop, per block: a fresh
        hop (or a bigger step than its last) is judged by that, not by its last step.
        """
        assert previous.step_s is not None  # it has just answered this step
        blocks = (self.hop.end - self.hop.start) / (previous.hop.end - previous.hop.start)
        expected = max(self.step_s or 0.0, previous.step_s * blocks)
        return max(PUSH_GRACE_MIN_S, PUSH_GRACE_FACTOR * expected)

    def record(self, chunks: list[torch.Tensor]) -> None:  # sent to the hop: its history
        self.inputs.extend(chunks)
        self.length += sum(chunk.shape[1] for chunk in chunks)
        self.tokens += sum(chunk.shape[0] * chunk.shape[1] for chunk in chunks)

    def rewind(self, position: int) -> None:
        """Forgets the positions from `position` on (the servers overwrite them; so must
        the history, or a later replay would rebuild the positions the caller rewound)."""
        # Only a rewind walks the history: a plain next step must not cost O(length).
        if position < self.length:
            self.inputs = keep_before(self.inputs, position)
            self.length = position


PUSH_GRACE_MIN_S = 0.05
PUSH_GRACE_FACTOR = 3.0
"""A hop's answer to a pushed step is awaited this many times the step's expected time
(see `Hop.push_grace_s`; at least PUSH_GRACE_MIN_S) before the client sends the step
itself: a lost push costs that much time once, never the output."""
