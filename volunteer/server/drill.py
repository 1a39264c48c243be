"""A server that answers wrong on purpose (the `faults` drill setting, see
`volunteer.faults`): for tests and drills of the checks, never for real service."""

from __future__ import annotations

import collections
import random

import torch

from volunteer.faults import OUTPUT_FAULTS, Faults


def misbehave(
    faults: Faults, output: torch.Tensor, previous: torch.Tensor | None, rng: random.Random
) -> torch.Tensor:
    """The output a faulty server answers with instead of `output` [B, S, H] (itself, when
    no fault strikes this step); `previous` is the session's previous output."""
    for fault in faults.faults:
        if fault.kind not in OUTPUT_FAULTS or rng.random() >= fault.rate:
            continue
        if fault.kind == "constant":
            return torch.zeros_like(output)
        if fault.kind == "stale":
            if previous is None or previous.shape[0] != output.shape[0]:
                return torch.zeros_like(output)
            return previous[:, -1:].expand_as(output).clone()
        return _perturbed(output, fault.scale, rng)
    return output


def _perturbed(output: torch.Tensor, scale: float, rng: random.Random) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    noise = torch.randn(output.shape, generator=generator, dtype=torch.float32)
    values = output.float()
    # Per position: the noise is `scale` times that position's own vector long.
    noise *= scale * values.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
    return (values + noise).to(output.dtype)


MAX_REMEMBERED = 1024
"""Sessions whose last output a drill keeps (for `stale`); the oldest is forgotten."""


class Drill:
    """A block server's faults (`volunteer.faults`) and what they need: a random source
    and each session's previous output."""

    def __init__(self, faults: Faults, *, seed: int | None = None) -> None:
        self.faults = faults
        self.rng = random.Random(seed)
        self._previous: collections.OrderedDict[object, torch.Tensor] = collections.OrderedDict()

    def output(self, session: object, output: torch.Tensor) -> torch.Tensor:
        """What the server answers for `session`'s step instead of `output`."""
        previous = self._previous.pop(session, None)
        self._previous[session] = output
        while len(self._previous) > MAX_REMEMBERED:
            self._previous.popitem(last=False)
        return misbehave(self.faults, output, previous, self.rng)
