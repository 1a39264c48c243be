"""Compressed linear weights (models/quant.py, q4_weight.py, int8_weight.py): group-wise
4-bit `Q4Weight` and 8-bit `Int8Weight` against their own dequantized weights, the
original weights and hand-made codes.

The matmuls run torch's packed int4 / int8 CPU kernels, whose layouts torch does not
document, so each product is checked against `x @ dequantize().T + bias` computed in float32:
a code read or packed in the wrong place moves an output by about the size of a product,
which is far outside the rounding the kernels are allowed. Those kernels take bfloat16
activations and scales (8 significant bits: each rounding to bfloat16 is off by at most
2**-8 of the value), so the tolerances below count the roundings each path makes and bound
the error elementwise by that many times 2**-8 of `|x| @ |W|.T + |bias|`, the largest the
sum's terms can add up to.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from volunteer.models import q4_weight
from volunteer.models.int8_weight import Int8Weight
from volunteer.models.q4_weight import Q4_CENTER, Q4Weight
from volunteer.models.quant import (
    DEFAULT_GROUP_SIZE,
    Q4_GROUP_SIZES,
    QuantError,
    linear,
)
from volunteer.models.weight_format import WeightFormat

# (N, K): a whole number of groups and of the CPU kernel's 16 rows for every group size; a
# tiny one padded both ways; N not a multiple of 16 with K not a multiple of any group size;
# SmolLM2-135M's hidden size as K (576 = 4.5 groups of 128) over five tiles of 16 rows (its
# full 960 rows cost a second a test to repack; the size and accuracy tests use them).
Q4_SHAPES = [(16, 128), (7, 3), (33, 200), (80, 576)]
# Inputs of rank 2 and 3, with one row and with several.
INPUT_BATCHES = [(1,), (5,), (1, 1), (2, 3)]

Q4_LINEAR_TOLERANCE = 2**-7 * 1.01
"""The int4 CPU kernel multiplies bfloat16 activations by the exact dequantized weight,
accumulates in float32 and rounds its output to bfloat16 (it matches that model bit for bit).
A float32 input pays one rounding on the way in and one on the way out; a bfloat16 one pays
the output's and the bias addition's (done in bfloat16). Either way two roundings: 2 * 2**-8;
the extra 1 % covers float32 accumulation and the reference's own rounding."""

INT8_LINEAR_TOLERANCE = 2**-6
"""The int8 CPU kernel (per-channel scales) rounds the input, the row's scale and the output
to bfloat16: three roundings, 3 * 2**-8, bounded by 4 * 2**-8. The dequantizing path (groups
of 32, or bfloat16 inputs) makes at most three too (weight, output, bias addition)."""

GRAD_TOLERANCE = 2**-12
"""Both gradients are float32 products of the same tensors, summed in a different order: a
float32 sum of n terms is off by at most about n * 2**-24 of the sum of their magnitudes,
under 2**-12 for the n <= 960 here."""


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _magnitude(
    x: torch.Tensor, abs_weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """|x| @ |W|.T + |bias| in float32 (given |W|): what each output's error is measured
    against."""
    out = x.float().abs() @ abs_weight.T
    return out if bias is None else out + bias.float().abs()


def _assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    error = (got.float() - want.float()).abs()
    worst = (error / bound).max().item()
    assert bool((error <= bound).all()), f"{what}: error is {worst:.3g} times the bound"


def _padded_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight with zero columns up to whole groups, as FlexGen (and `quantize`) groups it."""
    k = weight.shape[1]
    return F.pad(weight, (0, -(-k // group_size) * group_size - k))


# --- Q4Weight: the kernel's matmul -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", Q4_SHAPES)
@pytest.mark.parametrize("group_size", Q4_GROUP_SIZES)
def test_q4_linear_matches_its_dequantized_weight(
    group_size: int, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    """`linear` through the int4 CPU kernel equals `x @ dequantize().T + bias` within two
    bfloat16 roundings (`Q4_LINEAR_TOLERANCE`), for padded and unpadded shapes, inputs of
    rank 2 and 3 with one row and several; the output keeps the input's shape and dtype."""
    n, k = shape
    gen = _gen(n * k + group_size)
    q4 = Q4Weight.quantize(torch.randn(n, k, generator=gen), group_size)
    dequantized = q4.dequantize()
    assert dequantized.shape == (n, k)
    abs_weight = dequantized.abs()
    for batch in INPUT_BATCHES:
        x = torch.randn(*batch, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        for b in (None, bias):
            got = q4.linear(x, b)
            assert got.shape == (*batch, n)
            assert got.dtype == dtype
            want = x.float() @ dequantized.T
            if b is not None:
                want = want + b.float()
            bound = Q4_LINEAR_TOLERANCE * _magnitude(x, abs_weight, b)
            _assert_within(got, want, bound, f"input {tuple(x.shape)}, bias {b is not None}")


def test_q4_linear_is_close_to_the_original_weight() -> None:
    """The product is also close to the unquantized one (not only self-consistent). Each
    weight is off by a rounding error spread evenly over one step, RMS step / sqrt(12); the
    range of 32 normal samples is about 4.1 sigma, so the step is 0.27 sigma and the error
    0.08 sigma, independent across weights: the output's relative error is about 8 %,
    bounded here by 10 % (a misplaced code or scale gives about 140 %)."""
    gen = _gen(3)
    weight = torch.randn(960, 576, generator=gen)
    x = torch.randn(4, 576, generator=gen)
    got = Q4Weight.quantize(weight).linear(x, None)
    want = x @ weight.T
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < 0.1, relative


# --- Q4Weight: quantization --------------------------------------------------------------


@pytest.mark.parametrize("shape", Q4_SHAPES)
@pytest.mark.parametrize("group_size", Q4_GROUP_SIZES)
def test_q4_quantization_error_is_half_a_step(group_size: int, shape: tuple[int, int]) -> None:
    """FlexGen's grouping: in each group of `group_size` inputs of a row (zero-padded to whole
    groups), the step is (max - min) / 15 and every value decodes within half a step of the
    original. The kernel keeps scale and zero in bfloat16, so the stored step s is that one
    to 2**-8, and decoding (q - 8) * s + zero moves by at most 2**-8 * (8 s + |zero|) more:
    bounded here by s / 2 + 2**-7 * (9 s + |zero|). A wrong group axis or size, or an
    off-by-one in the center, breaks the step or the bound."""
    n, k = shape
    weight = torch.randn(n, k, generator=_gen(n + k)) * 0.05
    q4 = Q4Weight.quantize(weight, group_size)
    groups = _padded_weight(weight, group_size).view(n, -1, group_size)
    scale, zero = (t[:n] for t in q4.scales())
    assert scale.shape == groups.shape[:2]
    span = (groups.amax(-1) - groups.amin(-1)) / 15
    assert torch.allclose(scale, span, rtol=2**-8, atol=0), "the step is not (max - min) / 15"
    error = (q4.dequantize() - weight).abs()
    error = _padded_weight(error, group_size).view(n, -1, group_size)
    bound = scale / 2 + 2**-7 * (9 * scale + zero.abs())
    excess = (error.amax(-1) / bound).max().item()
    assert bool((error <= bound[..., None]).all()), f"error {excess:.3g} times the bound"


@pytest.mark.parametrize("value", [0.0, -2.5, 0.30078125, 2**-10])
def test_q4_constant_group_decodes_exactly(value: float) -> None:
    """A group whose values are all equal has no range: it is coded with step 0 and its
    value as the offset, so it decodes exactly. The values are ones bfloat16 holds exactly
    (the kernel keeps scales and zeros in bfloat16, so no other value could be exact); the
    row's other group is random."""
    weight = torch.randn(16, 64, generator=_gen(4))
    weight[:, :32] = value
    decoded = Q4Weight.quantize(weight, 32).dequantize()
    assert torch.equal(decoded[:, :32], weight[:, :32]), decoded[0, 0].item()


# --- Q4Weight: codes ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", Q4_SHAPES)
@pytest.mark.parametrize("group_size", Q4_GROUP_SIZES)
def test_q4_from_codes_round_trip(group_size: int, shape: tuple[int, int]) -> None:
    """Codes and per-group (scale, zero) given to `from_codes` come back from `codes()` and
    `scales()` (padding rows and columns are zero codes, and scale and zero 0 in padded rows),
    through the CPU kernel's own layout; `dequantize` is (q - 8) * scale + zero done by hand.
    Scales and zeros are bfloat16 values (the kernel's dtype, see the module's docstring on
    precision) and of both signs (GGUF's Q4_0 steps are often negative)."""
    n, k = shape
    groups = -(-k // group_size)
    gen = _gen(n * k)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.randn(n, groups, generator=gen).bfloat16().float()
    zero = torch.randn(n, groups, generator=gen).bfloat16().float()
    q4 = Q4Weight.from_codes(codes, scale, zero, shape=(n, k), group_size=group_size)
    assert q4.shape == (n, k)

    got_codes = q4.codes()
    rows, cols = got_codes.shape
    assert rows % 16 == 0 and rows >= n and cols == groups * group_size
    assert got_codes.dtype == torch.uint8
    assert torch.equal(got_codes[:n, :k], codes)
    assert not got_codes[n:].any() and not got_codes[:, k:].any()
    got_scale, got_zero = q4.scales()
    assert got_scale.shape == got_zero.shape == (rows, groups)
    assert torch.equal(got_scale[:n], scale) and torch.equal(got_zero[:n], zero)
    assert not got_scale[n:].any() and not got_zero[n:].any()

    by_hand = (codes.float() - Q4_CENTER) * scale.repeat_interleave(group_size, 1)[:, :k]
    by_hand = by_hand + zero.repeat_interleave(group_size, 1)[:, :k]
    assert torch.equal(q4.dequantize(), by_hand)
    assert q4.dequantize(torch.bfloat16).dtype == torch.bfloat16

    # Codes already padded to whole groups and rows give the same weight.
    padded = F.pad(codes, (0, cols - k, 0, rows - n))
    again = Q4Weight.from_codes(padded, scale, zero, shape=(n, k), group_size=group_size)
    assert torch.equal(again.codes(), got_codes)


def test_q4_quantize_round_trips_through_from_codes() -> None:
    """What `quantize` made, rebuilt from its own codes and scales, is the same weight."""
    q4 = Q4Weight.quantize(torch.randn(33, 200, generator=_gen(5)), 64)
    scale, zero = q4.scales()
    again = Q4Weight.from_codes(q4.codes(), scale, zero, shape=(33, 200), group_size=64)
    assert torch.equal(again.dequantize(), q4.dequantize())


# --- Q4Weight: refusals ------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [48, 16, 256])
def test_q4_bad_group_size_is_refused(group_size: int) -> None:
    """Only the kernels' group sizes are taken, and the message names the allowed ones."""
    with pytest.raises(QuantError, match=rf"group size {group_size} is not one of 32, 64, 128"):
        Q4Weight.quantize(torch.randn(16, 96), group_size)
    with pytest.raises(QuantError, match=rf"group size {group_size}"):
        Q4Weight.from_codes(
            torch.zeros(16, 96, dtype=torch.uint8),
            torch.ones(16, 2),
            torch.zeros(16, 2),
            shape=(16, 96),
            group_size=group_size,
        )


@pytest.mark.parametrize("shape", [(64,), (2, 16, 32)])
def test_q4_non_matrix_weight_is_refused(shape: tuple[int, ...]) -> None:
    """A linear weight is a matrix: anything else is refused, saying what it got."""
    with pytest.raises(QuantError, match=re.escape(f"2-D, not {shape}")):
        Q4Weight.quantize(torch.randn(*shape))


def test_q4_from_codes_refuses_codes_or_scales_too_small() -> None:
    """Codes that do not cover the weight, or scales that do not cover its groups, are
    refused rather than padded into a different weight."""
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    ones, zeros = torch.ones(16, 2), torch.zeros(16, 2)
    with pytest.raises(QuantError, match="smaller than the weight"):
        Q4Weight.from_codes(codes[:, :40], ones, zeros, shape=(16, 64), group_size=32)
    with pytest.raises(QuantError, match="do not cover"):
        Q4Weight.from_codes(codes, ones[:, :1], zeros[:, :1], shape=(16, 64), group_size=32)
    with pytest.raises(QuantError, match="do not cover"):
        Q4Weight.from_codes(codes, ones, zeros[:, :1], shape=(16, 64), group_size=32)


# --- Q4Weight: size and device -----------------------------------------------------------


def test_a_kernel_check_is_made_once_per_device_group_size_and_shape() -> None:
    """Where the kernel is checked (off the CPU), a weight rebuilt on every forward of a
    streamed span must not check it again: the verdict is kept by device, group size and
    shape. Driven on the CPU here, whose kernel the loads do not check."""
    first = Q4Weight.quantize(torch.randn(48, 64, generator=_gen(21)), 32)
    key = ("cpu", 32, (48, 64))
    q4_weight._KERNEL_VERDICTS.pop(key, None)
    try:
        assert first._kernel_verdict() is True  # checked: the CPU kernel agrees
        assert q4_weight._KERNEL_VERDICTS[key] is True
        q4_weight._KERNEL_VERDICTS[key] = False  # a kept verdict is what others get
        second = Q4Weight.quantize(torch.randn(48, 64, generator=_gen(22)), 32)
        assert second._kernel_verdict() is False
        other_shape = Q4Weight.quantize(torch.randn(32, 64, generator=_gen(23)), 32)
        assert other_shape._kernel_verdict() is True
    finally:
        for each in (key, ("cpu", 32, (32, 64))):
            q4_weight._KERNEL_VERDICTS.pop(each, None)


def test_q4_nbytes_is_a_fraction_of_float32() -> None:
    """4-bit codes plus a bfloat16 scale and offset per group of 32 are 0.5 + 4/32 bytes a
    weight, 0.156 of float32's 4: at most 0.2 (no second copy of codes or scales kept)."""
    weight = torch.randn(960, 576, generator=_gen(6))
    q4 = Q4Weight.quantize(weight, DEFAULT_GROUP_SIZE)
    float_bytes = weight.numel() * 4
    # What capacity planning counts for it, without building it.
    assert WeightFormat.parse("q4").projection_bytes(960, 576) == q4.nbytes
    assert q4.nbytes <= 0.2 * float_bytes, q4.nbytes / float_bytes
    assert q4.nbytes >= (0.5 + 4 / 32) * weight.numel(), "fewer bytes than codes and scales"


def test_q4_to_its_own_device_is_itself() -> None:
    """Moving to the device it is on neither copies nor repacks."""
    q4 = Q4Weight.quantize(torch.randn(16, 64, generator=_gen(7)))
    assert q4.device == torch.device("cpu")
    assert q4.to("cpu") is q4
    assert q4.to(torch.device("cpu")) is q4


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device to run the int4 CUDA path"
)
@pytest.mark.parametrize("shape", [(960, 576), (33, 200)])
def test_q4_on_cuda_matches_cpu(shape: tuple[int, int]) -> None:
    """The CUDA copy (CUDA's int4 kernel where it agrees, else dequantizing) computes the
    same product as the CPU one: both within 2**-6 of |x| @ |W|.T (the CUDA kernel may round
    the dequantized weight to bfloat16 too: three roundings) of the float32 reference, and
    the weight survives the move unchanged."""
    n, k = shape
    gen = _gen(8)
    q4 = Q4Weight.quantize(torch.randn(n, k, generator=gen))
    x = torch.randn(2, 3, k, generator=gen)
    on_gpu = q4.to("cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.dequantize().cpu(), q4.dequantize())
    got = on_gpu.linear(x.cuda(), None)
    assert got.device.type == "cuda" and got.dtype == x.dtype and got.shape == (2, 3, n)
    dequantized = q4.dequantize()
    bound = 2**-6 * _magnitude(x, dequantized.abs(), None)
    _assert_within(got.cpu(), x @ dequantized.T, bound, "CUDA against the reference")
    _assert_within(got.cpu(), q4.linear(x, None), 2 * bound, "CUDA against CPU")


# --- Int8Weight ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 32), (33, 96), (64, 576)])
@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_linear_matches_its_dequantized_weight(
    group_size: int | None, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    """Per-channel (the int8 CPU kernel) and groups of 32 (dequantized, or the kernel where
    K is one group): `linear` equals `x @ dequantize().T + bias` within
    `INT8_LINEAR_TOLERANCE`, keeping the input's shape and dtype."""
    n, k = shape
    gen = _gen(n + k)
    int8 = Int8Weight.quantize(torch.randn(n, k, generator=gen), group_size)
    dequantized = int8.dequantize()
    abs_weight = dequantized.abs()
    for batch in INPUT_BATCHES:
        x = torch.randn(*batch, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        for b in (None, bias):
            got = int8.linear(x, b)
            assert got.shape == (*batch, n) and got.dtype == dtype
            want = x.float() @ dequantized.T
            if b is not None:
                want = want + b.float()
            bound = INT8_LINEAR_TOLERANCE * _magnitude(x, abs_weight, b)
            _assert_within(got, want, bound, f"input {tuple(x.shape)}, bias {b is not None}")


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_quantization_error_is_half_a_step(group_size: int | None) -> None:
    """Symmetric absmax: the step is the group's (or row's) max |w| / 127 and every value
    decodes within half a step (plus 2**-14 of one for float32 arithmetic)."""
    n, k = 33, 96
    weight = torch.randn(n, k, generator=_gen(9))
    int8 = Int8Weight.quantize(weight, group_size)
    size = k if group_size is None else group_size
    assert int8.group_size == size and int8.codes.dtype == torch.int8
    groups = weight.view(n, k // size, size)
    assert torch.allclose(int8.scale, groups.abs().amax(-1) / 127, rtol=2**-20, atol=0)
    error = (int8.dequantize() - weight).view(n, k // size, size).abs()
    bound = int8.scale[..., None] * (0.5 + 2**-14)
    assert bool((error <= bound).all()), (error / bound).max().item()


def test_int8_zero_group_decodes_to_zero() -> None:
    """An all-zero group (absmax 0) gets a usable step and decodes to zeros, not NaN."""
    weight = torch.randn(4, 64, generator=_gen(10))
    weight[:, 32:] = 0
    decoded = Int8Weight.quantize(weight, 32).dequantize()
    assert torch.equal(decoded[:, 32:], torch.zeros(4, 32))


def test_int8_refuses_inputs_not_in_whole_groups() -> None:
    """K = 40 does not split in groups of 32: refused, with both numbers in the message."""
    with pytest.raises(QuantError, match="40 inputs do not split in groups of 32"):
        Int8Weight.quantize(torch.randn(4, 40), 32)
    with pytest.raises(QuantError, match=r"do not split a 4x40 weight in groups of 32"):
        Int8Weight(torch.zeros(4, 40, dtype=torch.int8), torch.ones(4, 1), group_size=32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float32])
def test_int8_refuses_codes_that_are_not_int8(dtype: torch.dtype) -> None:
    """Codes of another dtype are refused, naming it (uint8 would read 128..255 wrongly)."""
    with pytest.raises(QuantError, match=rf"must be int8, not {dtype}"):
        Int8Weight(torch.zeros(4, 32, dtype=dtype), torch.ones(4, 1), group_size=32)


# --- linear() and its backward -----------------------------------------------------------


def test_linear_with_a_tensor_is_f_linear() -> None:
    """A plain tensor weight goes straight to F.linear (same result, same autograd)."""
    gen = _gen(11)
    x, weight, bias = (torch.randn(*s, generator=gen) for s in [(2, 3, 24), (10, 24), (10,)])
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert torch.equal(linear(x, weight, None), F.linear(x, weight))


def _compressed(kind: str) -> Q4Weight | Int8Weight:
    weight = torch.randn(40, 96, generator=_gen(12))
    if kind == "q4":
        return Q4Weight.quantize(weight, 32)
    return Int8Weight.quantize(weight, None if kind == "int8 per channel" else 32)


KINDS = ["q4", "int8 per channel", "int8 groups"]


@pytest.mark.parametrize("kind", KINDS)
def test_linear_without_grad_is_the_weights_own(kind: str) -> None:
    """With nothing to differentiate, `linear` is the weight's own matmul, no graph."""
    weight = _compressed(kind)
    x = torch.randn(3, 96, generator=_gen(13))
    bias = torch.randn(40, generator=_gen(14))
    out = linear(x, weight, bias)
    assert out.grad_fn is None
    assert torch.equal(out, weight.linear(x, bias))


@pytest.mark.parametrize("kind", KINDS)
def test_an_inexact_dtype_answer_is_the_exact_one_before_its_cast(kind: str) -> None:
    """`exact_dtype=False` skips only the cast back from a kernel's bfloat16, for a
    float32 input; other inputs get their own dtype, since bfloat16 would promote them
    to float32 in the op that follows."""
    weight = _compressed(kind)
    x = torch.randn(3, 96, generator=_gen(15))
    exact = linear(x, weight, None)
    inexact = linear(x, weight, None, exact_dtype=False)
    assert exact.dtype == torch.float32
    assert inexact.dtype in (torch.float32, torch.bfloat16)  # bfloat16 where a kernel ran
    assert torch.equal(inexact.float(), exact)
    for dtype in (torch.float16, torch.bfloat16):
        assert linear(x.to(dtype), weight, None, exact_dtype=False).dtype == dtype


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [(4,), (2, 3)])
def test_linear_backward_goes_through_the_dequantized_weight(
    kind: str, batch: tuple[int, ...]
) -> None:
    """Through a frozen compressed weight, the forward is the weight's own matmul and the
    backward gives the input and the bias the gradients that F.linear with the dequantized
    weight gives (within `GRAD_TOLERANCE` of the magnitudes summed)."""
    weight = _compressed(kind)
    gen = _gen(15)
    x = torch.randn(*batch, 96, generator=gen, requires_grad=True)
    bias = torch.randn(40, generator=gen, requires_grad=True)
    upstream = torch.randn(*batch, 40, generator=gen)

    out = linear(x, weight, bias)
    assert out.requires_grad
    assert torch.equal(out.detach(), weight.linear(x.detach(), bias.detach()))
    grad_x, grad_bias = torch.autograd.grad(out, (x, bias), upstream)

    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    dequantized = weight.dequantize()
    out_ref = F.linear(x_ref, dequantized, bias_ref)
    want_x, want_bias = torch.autograd.grad(out_ref, (x_ref, bias_ref), upstream)

    assert grad_x.shape == x.shape and grad_bias.shape == bias.shape
    bound_x = GRAD_TOLERANCE * (upstream.abs() @ dequantized.abs())
    _assert_within(grad_x, want_x, bound_x, "input gradient")
    bound_bias = GRAD_TOLERANCE * upstream.abs().reshape(-1, 40).sum(0)
    _assert_within(grad_bias, want_bias, bound_bias, "bias gradient")


def test_linear_backward_reaches_a_bias_alone() -> None:
    """A trainable bias on a frozen input still gets its gradient (the sum of the upstream
    gradient over every row), and the input none."""
    weight = _compressed("q4")
    x = torch.randn(2, 3, 96, generator=_gen(16))
    bias = torch.zeros(40, requires_grad=True)
    upstream = torch.randn(2, 3, 40, generator=_gen(17))
    linear(x, weight, bias).backward(upstream)
    assert x.grad is None
    assert bias.grad is not None
    assert torch.allclose(bias.grad, upstream.sum((0, 1)), rtol=0, atol=1e-5)
