"""The weight form `dtype = auto` takes: the fastest here of those that keep quality
(the smallest of those near the fastest).

fp32, bf16 and q4 (groups of 32) each keep SmolLM2's held-out perplexity within 5% of
float32 (`bench/local_generate.py` prints each; `tests/models/test_quality.py` holds q4
to it); larger 4-bit groups do not, nor does a 4-bit LM head. Which is fastest depends
on the CPU (bfloat16 and int4 kernels need instructions old CPUs lack, and then lose to
float32) or the GPU.
So it is measured: several blocks' projections at a decode step's batch of 1, each
form, best of a few rounds (well under a second), once per process. Several blocks,
because decoding streams every block's weights from memory: one block alone would sit
in the CPU's caches and favour float32.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch

from volunteer.models.quant import linear
from volunteer.models.weight_format import WeightFormat

CANDIDATES = ("q4", "bf16", "fp32")
"""Smallest first: within `NEAR` of the fastest, the smaller form wins (less memory,
and a choice that does not flip between daemons of one machine on timing noise)."""
NEAR = 1.2
PROJECTIONS = ((960, 576), (576, 576), (3072, 576), (576, 1536))
"""[out, in] of one SmolLM2-135M block's fused projections: small enough to time in
milliseconds, shaped like what decoding runs."""
BLOCKS = 8
"""Blocks timed together: 110 MB in float32, more than CPU caches hold."""
ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class FormatChoice:
    fmt: WeightFormat
    seconds: dict[str, float]
    """Per candidate label: one block's projections at batch 1, best round."""

    @property
    def reason(self) -> str:
        times = ", ".join(f"{label} {s * 1e3:.2f} ms" for label, s in self.seconds.items())
        return (
            f"{self.fmt.label}, the fastest here or the smallest near it (one block's "
            f"projections: {times})"
        )


def resolve_format(setting: str) -> WeightFormat:
    """The form a `dtype` setting names; `auto`: the fastest measured here."""
    if setting == "auto":
        return fastest_format().fmt
    return WeightFormat.parse(setting)


@functools.cache
def fastest_format() -> FormatChoice:
    """Times each candidate (see the module docstring); cached for the process."""
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for label in CANDIDATES:
        fmt = WeightFormat.parse(label)
        shapes = PROJECTIONS * BLOCKS
        weights = [fmt.compress(torch.randn(shape, generator=generator)) for shape in shapes]
        inputs = [
            torch.randn(1, shape[1], generator=generator).to(fmt.activation_dtype)
            for shape in shapes
        ]
        seconds[label] = _best_round(weights, inputs) / BLOCKS
    fastest = min(seconds.values())
    best = next(label for label in CANDIDATES if seconds[label] <= NEAR * fastest)
    return FormatChoice(WeightFormat.parse(best), seconds)


def _best_round(weights: list, inputs: list[torch.Tensor]) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for weight, x in zip(weights, inputs, strict=True):
                linear(x, weight, None)
            best = min(best, time.perf_counter() - start)
    return best
