"""When two computations of the same blocks on the same input agree.

Honest servers differ: other thread counts, a prefill against single steps, other
hardware sum in other orders. `bench/tolerance.py` measures how much, on the embedded
model: in float32 on CPU, at most about 1e-5 of a position's norm (threads 1 against 2,
a prefill against steps, chunks of 7); in bfloat16, about 3e-2, against itself or
against float32. The tolerances below leave a wide margin over what honest servers
differ by, and a drill's `perturb:RATE:0.05` (5% of the norm) is caught in float32 but
hidden in bfloat16's rounding: a server that computes in bfloat16 can be caught only
for errors above 10% of a position's norm. GPUs were not measured here.

Outputs are compared per position, as the largest relative distance
||a - b|| / ||b||: a wrong position cannot hide among right ones.
"""

from __future__ import annotations

import torch

FLOAT32_TOLERANCE = 1e-3
"""The largest relative distance of two float32 computations deemed the same."""
HALF_TOLERANCE = 0.1
"""The same where either side computes in bfloat16 or float16."""
_TINY = 1e-12


def tolerance_for(*dtypes: torch.dtype | str) -> float:
    """The tolerance for comparing computations done in these dtypes."""
    names = {str(dtype).removeprefix("torch.") for dtype in dtypes}
    return HALF_TOLERANCE if names & {"bfloat16", "float16"} else FLOAT32_TOLERANCE


def tolerance_for_format(label: str | None) -> float:
    """The tolerance for checking servers that hold their weights in the form `label`
    (`WeightFormat.label`; None: float32): 4-bit kernels multiply in bfloat16 whatever
    the activations' dtype, so a prefill and single steps of the same q4 blocks differ by
    about 1e-2 of a position's norm on some CPUs (AMD EPYC), as bfloat16 does."""
    if label is not None and label.startswith(("q4", "bf16")):
        return HALF_TOLERANCE
    return FLOAT32_TOLERANCE


def relative_distances(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||output - reference|| / ||reference|| per position: [B, S] for [B, S, H] inputs.

    Raises:
        ValueError: the shapes differ.
    """
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: {list(output.shape)} vs {list(reference.shape)}")
    right = reference.float()
    wrong = output.float()
    distance = (wrong - right).norm(dim=-1)
    scale = right.norm(dim=-1).clamp_min(_TINY)
    # NaN or inf anywhere in a position makes it as far as can be.
    return torch.where(torch.isfinite(distance), distance / scale, torch.inf)


def first_mismatch(output: torch.Tensor, reference: torch.Tensor, tolerance: float) -> int | None:
    """The first position (over the batch) where `output` is farther than `tolerance`
    from `reference`; None when every position agrees. Differing shapes mismatch at 0."""
    if output.shape != reference.shape:
        return 0
    far = (relative_distances(output, reference) > tolerance).any(dim=0)
    positions = torch.nonzero(far)
    return int(positions[0]) if len(positions) else None
