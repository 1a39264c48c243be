"""What a training step is made of, shared by the driver's parts: each microbatch's
logged pass through a stage, the work a peer is receipted for, a stage's settled step,
the step's report; and the timeouts of the driver's calls."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import torch

CALL_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 3.0
"""For the small calls: a peer's step, the roster, a reset."""
T = TypeVar("T")


class TrainingStalled(RuntimeError):
    """A step cannot close: a stage has no peer left that can take its work."""


@dataclasses.dataclass
class Work:
    """One microbatch's pass through one stage, as the driver logged it."""

    key: str
    given: torch.Tensor
    """Its input to the stage: token ids (first stage) or hidden states."""
    second: torch.Tensor
    """The gradient w.r.t. the stage's output, or the targets (last stage)."""
    output: torch.Tensor | None = None
    """What the peer answered: the hidden states it passed on (not on the last stage)."""
    grad_in: torch.Tensor | None = None
    """What it answered: the gradient w.r.t. its input (not on the first stage)."""
    loss: float | None = None
    """What it answered: the loss sum (the last stage only)."""

    @property
    def samples(self) -> int:
        return self.given.shape[0]


@dataclasses.dataclass(frozen=True)
class PeerWork:
    """What a stage peer did in a step that the stage kept: receipted by the driver."""

    peer: str
    start: int
    end: int
    tokens: int
    """Positions it ran through its blocks, forward and backward."""
    checked: int
    """Its shares the validators recomputed (and found right) in the step."""


@dataclasses.dataclass(frozen=True)
class Settled:
    """A stage's step once its shares are agreed, before it applies them."""

    stage: int
    round: int
    members: list[str]
    """The stage's peers that answered the round's gather (they apply)."""
    kept: list[str]
    dropped: list[str]


@dataclasses.dataclass(frozen=True)
class Applying:
    """What a stage applies to close a step: its settled round's shares, weighted by the
    sequences the driver counted (peer -> sequences)."""

    stage: int
    round: int
    included: dict[str, int]

    def header(self, step: int) -> dict[str, object]:
        """The `apply` call that closes `step` on a peer of the stage."""
        return {"op": "apply", "step": step, "round": self.round, "included": self.included}


@dataclasses.dataclass
class StepReport:
    step: int
    loss: float
    seconds: float
    dropped: list[str]
    banned: list[str]
    rounds: int
    unchecked: list[str] = dataclasses.field(default_factory=list)
    """Peers whose shares went into the aggregate without a recomputation."""


async def together(work: Iterable[Awaitable[T]]) -> list[T]:
    """The results of running `work` at once; the first failure cancels the rest, so
    nothing of a failed step runs on."""
    tasks = [asyncio.ensure_future(each) for each in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
