"""Linear weights kept compressed: group-wise 4-bit and 8-bit.

Decoding reads every weight once per token, so its speed follows the bytes read. FlexGen
(see `shared/seeds/`) keeps weights in 4 bits, in groups along the input dimension with a
minimum and a step per group, at a negligible cost in accuracy; so do GGUF's Q4_0/Q4_1,
whose blocks of 32 map onto the same form (`Q4Weight.from_codes`; the kernels keep each
group's step and offset in bfloat16, three bits short of GGUF's float16).

A compressed weight (`Q4Weight` in `q4_weight`, `Int8Weight` in `int8_weight`) is an
object with `linear(x, bias)`, held in a block's `BlockWeights` in place of a tensor;
`linear` below calls either kind. Its matmul uses
torch's packed int4 kernel where one serves its device (the CPU one with bfloat16
activations: with float32 ones it is many times slower than a float32 matmul), and
otherwise dequantizes and multiplies, which is correct everywhere.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

Q4_GROUP_SIZES = (32, 64, 128)
"""Group sizes the packed int4 kernels take (and FlexGen's range)."""
DEFAULT_GROUP_SIZE = 32
"""GGUF's block size, so a Q4 file loads as it is; also the most accurate of the three."""


class QuantError(ValueError):
    """A weight that cannot take the asked form (bad group size, wrong shapes)."""


class CompressedWeight(Protocol):
    """What a block needs of a weight held compressed."""

    shape: torch.Size
    """[out_features, in_features], as the tensor it stands for."""

    @property
    def device(self) -> torch.device: ...

    @property
    def nbytes(self) -> int: ...

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, *, exact_dtype: bool = True
    ) -> torch.Tensor: ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | CompressedWeight,
    bias: torch.Tensor | None,
    *,
    exact_dtype: bool = True,
) -> torch.Tensor:
    """`F.linear` for a plain tensor; the compressed weight's own matmul otherwise (with
    the input's gradient, for a backward through frozen compressed blocks).

    With `exact_dtype=False` a compressed weight may answer in its kernel's dtype rather
    than x's, for a caller whose next op takes either (a residual add promotes for free,
    another compressed matmul wants the kernel's dtype anyway): a cast fewer per call, of
    the few hundred a decode step makes.
    """
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenLinear.apply(x, weight, bias)
    return weight.linear(x, bias, exact_dtype=exact_dtype)


class _FrozenLinear(torch.autograd.Function):
    """The kernels have no derivative: the input's gradient goes through the dequantized
    weight (the weight itself is frozen: it has none)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: CompressedWeight,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.weight = weight  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return weight.linear(x, bias)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        weight = ctx.weight  # type: ignore[attr-defined]
        grad_x = grad @ weight.dequantize(grad.dtype)
        grad_bias = None
        if ctx.has_bias:  # type: ignore[attr-defined]
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def check_group_size(group_size: int) -> int:
    if group_size not in Q4_GROUP_SIZES:
        sizes = ", ".join(map(str, Q4_GROUP_SIZES))
        raise QuantError(f"group size {group_size} is not one of {sizes}")
    return group_size


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))
