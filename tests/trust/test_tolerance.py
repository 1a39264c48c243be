"""The tolerance of the checks: honest computations of the same blocks (other thread
counts, a prefill against single steps) always agree; a wrong position is found, however
few its neighbours that are wrong."""

from __future__ import annotations

import random

import pytest
import torch
from volunteer.models.model import BlockSpan
from volunteer.models.weight_format import WeightFormat, compress_block

from tests.server import hidden_states, random_span, tiny_config
from volunteer.faults import parse_faults
from volunteer.server.drill import misbehave
from volunteer.trust.tolerance import (
    FLOAT32_TOLERANCE,
    HALF_TOLERANCE,
    first_mismatch,
    relative_distances,
    tolerance_for,
    tolerance_for_format,
)


def _steps(span: BlockSpan, hidden: torch.Tensor, threads: int, chunk: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            cache = span.allocate_cache(batch_size=hidden.shape[0], max_length=hidden.shape[1])
            outputs = []
            for position in range(0, hidden.shape[1], chunk):
                piece = hidden[:, position : position + chunk]
                outputs.append(span(piece, start_pos=position, cache=cache))
                cache.length = position + piece.shape[1]
            return torch.cat(outputs, dim=1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("seed", range(5))
def test_honest_computations_always_agree(seed: int) -> None:
    span = random_span(tiny_config(), seed=seed)
    hidden = hidden_states(2, 24, seed=seed)
    reference = _steps(span, hidden, threads=1, chunk=24)  # one prefill
    for threads, chunk in ((2, 24), (1, 1), (2, 1), (2, 5)):
        other = _steps(span, hidden, threads=threads, chunk=chunk)
        assert first_mismatch(other, reference, FLOAT32_TOLERANCE) is None
        assert float(relative_distances(other, reference).max()) < FLOAT32_TOLERANCE / 10


def test_a_single_wrong_position_is_found() -> None:
    reference = hidden_states(2, 30)
    wrong = reference.clone()
    wrong[1, 17:18] = misbehave(
        parse_faults("perturb:1.0:0.05"), reference[1:2, 17:18], None, random.Random(0)
    )
    assert first_mismatch(wrong, reference, FLOAT32_TOLERANCE) == 17
    # bfloat16's rounding hides an error of 5%: its tolerance is wider.
    assert first_mismatch(wrong, reference, HALF_TOLERANCE) is None


def test_nan_a_zero_answer_and_another_shape_mismatch() -> None:
    reference = hidden_states(1, 4)
    broken = reference.clone()
    broken[0, 2, 5] = float("nan")
    assert first_mismatch(broken, reference, FLOAT32_TOLERANCE) == 2
    assert first_mismatch(torch.zeros_like(reference), reference, HALF_TOLERANCE) == 0
    assert first_mismatch(reference[:, :3], reference, FLOAT32_TOLERANCE) == 0


def test_half_precision_on_either_side_widens_the_tolerance() -> None:
    assert tolerance_for(torch.float32, "float32") == FLOAT32_TOLERANCE
    assert tolerance_for(torch.float32, torch.bfloat16) == HALF_TOLERANCE
    assert tolerance_for("float16") == HALF_TOLERANCE


@pytest.mark.parametrize("label", ["fp32", "int8", "bf16", "q4g32", "q4g64"])
def test_each_weight_form_is_checked_within_what_its_honest_servers_differ_by(
    label: str,
) -> None:
    """A prefill against single steps of the same blocks held in each form: within the
    tolerance its checks use (4-bit kernels multiply in bfloat16 on some CPUs)."""
    fmt = WeightFormat.parse(label)
    span = random_span(tiny_config(), seed=3)
    for block in span.blocks:
        compress_block(block, fmt)
    hidden = hidden_states(1, 24, seed=3).to(fmt.activation_dtype)
    reference = _steps(span, hidden, threads=1, chunk=24)
    for threads, chunk in ((2, 1), (1, 5)):
        other = _steps(span, hidden, threads=threads, chunk=chunk)
        assert first_mismatch(other, reference, tolerance_for_format(fmt.label)) is None
    assert tolerance_for_format(None) == FLOAT32_TOLERANCE
