"""`Int8Weight`: a linear weight in 8 bits, per row or per group (see
`volunteer.models.quant`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from volunteer.models.quant import QuantError


class Int8Weight:
    """A [N, K] weight in 8 bits: w = q * scale, q in -127..127, one scale per group of
    `group_size` inputs of a row (a whole row: per-channel, which torch's int8 kernel
    serves; GGUF's Q8_0 uses groups of 32, which are dequantized to multiply)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, *, group_size: int) -> None:
        n, k = codes.shape
        if codes.dtype != torch.int8:
            raise QuantError(f"int8 codes must be int8, not {codes.dtype}")
        if k % group_size or scale.shape != (n, k // group_size):
            raise QuantError(
                f"scales {tuple(scale.shape)} do not split a {n}x{k} weight in groups of "
                f"{group_size}"
            )
        self.shape = codes.shape
        self.group_size = group_size
        self.codes = codes
        self.scale = scale.float()
        self._kernel_scale = self.scale[:, 0].bfloat16() if scale.shape[1] == 1 else None

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int | None = None) -> Int8Weight:
        """Symmetric absmax quantization, per row (group_size None) or per group."""
        n, k = weight.shape
        size = k if group_size is None else group_size
        if k % size:
            raise QuantError(f"{k} inputs do not split in groups of {size}")
        groups = weight.float().reshape(n, k // size, size)
        scale = groups.abs().amax(-1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (groups / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(codes.view(n, k), scale, group_size=size)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        groups = self.codes.view(n, -1, self.group_size).to(dtype)
        return (groups * self.scale[..., None].to(dtype)).view(n, k)

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, *, exact_dtype: bool = True
    ) -> torch.Tensor:
        """x @ W.T (+ bias), in x's dtype (unless `exact_dtype`: in bfloat16 for a float32
        x, where the kernel runs in it)."""
        if self._kernel_scale is None or x.device.type != "cpu":
            return F.linear(x, self.dequantize(x.dtype), bias)
        n, k = self.shape
        flat = x.reshape(-1, k)
        if flat.dtype != torch.bfloat16:
            flat = flat.to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.codes, self._kernel_scale)
        if exact_dtype or x.dtype != torch.float32:  # bfloat16 promotes only to float32
            out = out.to(x.dtype)
        out = out.reshape(*x.shape[:-1], n)
        return out if bias is None else out + bias
