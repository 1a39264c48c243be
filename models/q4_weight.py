"""`Q4Weight`: a linear weight in FlexGen's group-wise 4 bits (see `volunteer.models.quant`)."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from volunteer.models.quant import (
    DEFAULT_GROUP_SIZE,
    QuantError,
    check_group_size,
    pad_to,
    round_up,
)

logger = logging.getLogger(__name__)

_KERNEL_VERDICTS: dict[tuple[str, int, tuple[int, int]], bool] = {}
"""Whether a device's int4 kernel agreed with dequantizing, by (device, group size,
padded shape): see `Q4Weight._kernel_verdict`."""

Q4_ROW_MULTIPLE = 16
"""The CPU int4 kernel wants the output rows in multiples of this; others are padded."""
Q4_CENTER = 8
"""The kernels' codes are signed around this: w = (q - 8) * scale + zero."""


class Q4Weight:
    """A [N, K] weight in 4 bits: in each group of `group_size` inputs of a row,
    w = (q - 8) * scale + zero, q in 0..15.

    K is padded with zero columns up to a whole group (the input is padded to match)
    and N with zero rows up to the kernels' multiple (the extra outputs are dropped).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        *,
        group_size: int,
        shape: tuple[int, int],
    ) -> None:
        """`codes`: [Np, Kp] codes 0..15 (uint8 or int32), padded already; `scale`,
        `zero`: [Np, Kp / group_size]. Use `quantize` or `from_codes`."""
        self.shape = torch.Size(shape)
        self.group_size = group_size
        self._padded = (codes.shape[0], codes.shape[1])
        self._device = codes.device
        self._scale_zero: torch.Tensor | None = torch.stack([scale, zero], dim=-1).float()
        self._packed: torch.Tensor | None = None
        self._kernel_scale_zero: torch.Tensor | None = None
        self._codes = torch.empty(0, dtype=torch.uint8, device=codes.device)
        self._use_kernel = _kernel_kind(codes.device) is not None
        if not self._use_kernel or not self._pack_for_kernel(codes):
            codes = codes.to(torch.uint8)
            self._codes = codes[:, 0::2] | (codes[:, 1::2] << 4)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Q4Weight:
        """FlexGen's group-wise quantization: each group's min and max span 16 levels."""
        check_group_size(group_size)
        if weight.dim() != 2:
            raise QuantError(f"a linear weight is 2-D, not {tuple(weight.shape)}")
        n, k = weight.shape
        padded = pad_to(weight.float(), round_up(n, Q4_ROW_MULTIPLE), round_up(k, group_size))
        groups = padded.view(padded.shape[0], -1, group_size)
        low = groups.amin(-1)
        high = groups.amax(-1)
        scale = (high - low) / 15
        # A constant group gets step 0 and its value as the offset, which the kernel's
        # bfloat16 scales hold as well as they hold any value (a step of 1 instead would
        # put the offset near 8, where bfloat16 steps by 1/16).
        step = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (groups - low[..., None]).div_(step[..., None]).round_().clamp_(0, 15)
        codes.masked_fill_(scale[..., None] == 0, Q4_CENTER)
        zero = torch.where(scale > 0, low + Q4_CENTER * scale, low)
        # In range and padded already: no need of `from_codes`'s checks.
        codes = codes.view(padded.shape).to(torch.int32)
        return cls(codes, scale, zero, group_size=group_size, shape=(n, k))

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        *,
        shape: tuple[int, int],
        group_size: int,
    ) -> Q4Weight:
        """From unpacked codes [N', K'] (uint8, 0..15) with w = (q - 8) * scale + zero
        per group; rows and columns past `shape` must be zero-coded padding, or are
        added here."""
        check_group_size(group_size)
        n, k = shape
        rows, cols = round_up(n, Q4_ROW_MULTIPLE), round_up(k, group_size)
        groups = cols // group_size
        if codes.shape[0] < n or codes.shape[1] < k:
            raise QuantError(f"codes {tuple(codes.shape)} are smaller than the weight {shape}")
        if scale.shape != zero.shape or scale.shape[0] < n or scale.shape[1] < groups:
            raise QuantError(f"scales {tuple(scale.shape)} do not cover {shape} in groups")
        codes = codes[:n, :k]
        if codes.numel() and int(codes.max()) > 15:
            raise QuantError(f"4-bit codes must lie in 0..15, not up to {int(codes.max())}")
        codes = pad_to(codes.to(torch.uint8), rows, cols)
        # Padded rows decode to zero: scale 0 and zero 0.
        scale = pad_to(scale[:n, :groups].float(), rows, groups)
        zero = pad_to(zero[:n, :groups].float(), rows, groups)
        return cls(codes, scale, zero, group_size=group_size, shape=shape)

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors it holds, by name, to save as they are and load with `from_held`
        without repacking (in the CPU kernel's layout, where packed for it)."""
        if self._codes.numel() == 0:
            assert self._packed is not None and self._kernel_scale_zero is not None
            return {"cpu_packed": self._packed, "scale_zero": self._kernel_scale_zero}
        scale, zero = self.scales()
        return {"codes": self._codes, "scale": scale, "zero": zero}

    @classmethod
    def from_held(
        cls, tensors: dict[str, torch.Tensor], *, shape: tuple[int, int], group_size: int
    ) -> Q4Weight:
        """A weight from `held_tensors` (which may come from disk: sizes are checked).

        Raises:
            QuantError: tensors that do not hold a weight of this shape.
        """
        check_group_size(group_size)
        n, k = shape
        rows, cols = round_up(n, Q4_ROW_MULTIPLE), round_up(k, group_size)
        groups = cols // group_size
        if "cpu_packed" not in tensors:
            codes = tensors.get("codes")
            if codes is None or codes.shape != (rows, cols // 2) or codes.dtype != torch.uint8:
                raise QuantError(f"held 4-bit codes do not fit a {n}x{k} weight")
            unpacked = _unpack_pairs(codes)
            return cls(
                unpacked, tensors["scale"], tensors["zero"], group_size=group_size, shape=shape
            )
        packed, scale_zero = tensors["cpu_packed"], tensors.get("scale_zero")
        if (
            packed.shape != (rows, cols // 2)
            or packed.dtype != torch.uint8
            or scale_zero is None
            or scale_zero.shape != (groups, rows, 2)
            or scale_zero.dtype != torch.bfloat16
            or packed.device.type != "cpu"
        ):
            raise QuantError(f"held packed 4-bit tensors do not fit a {n}x{k} weight")
        weight = cls.__new__(cls)
        weight.shape = torch.Size(shape)
        weight.group_size = group_size
        weight._device = packed.device
        weight._padded = (rows, cols)
        weight._codes = torch.empty(0, dtype=torch.uint8)
        weight._scale_zero = None
        weight._packed = packed
        weight._kernel_scale_zero = scale_zero
        weight._use_kernel = True
        return weight

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        held = (self._scale_zero, self._kernel_scale_zero, self._codes, self._packed)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def codes(self) -> torch.Tensor:
        """The unpacked codes [N', K'] (uint8, 0..15), padding included."""
        if self._codes.numel() == 0:
            return _unpack_cpu_kernel_order(self._packed, self._padded)
        return _unpack_pairs(self._codes)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero), each [N', groups] in float32."""
        if self._kernel_scale_zero is not None:
            sz = self._kernel_scale_zero.float().transpose(0, 1)
            return sz[..., 0], sz[..., 1]
        assert self._scale_zero is not None  # dropped only once the kernel's are made
        return self._scale_zero[..., 0], self._scale_zero[..., 1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        scale, zero = self.scales()
        codes = self.codes().float().view(scale.shape[0], scale.shape[1], self.group_size)
        values = (codes - Q4_CENTER) * scale[..., None] + zero[..., None]
        return values.flatten(1)[:n, :k].to(dtype)

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, *, exact_dtype: bool = True
    ) -> torch.Tensor:
        """x @ W.T (+ bias), in x's dtype (unless `exact_dtype`: in bfloat16 for a float32
        x, where the kernel runs in it)."""
        n, k = self.shape
        if not self._use_kernel or x.device != self._device:
            return F.linear(x, self.dequantize(x.dtype), bias)
        # Each op here runs four times per block and token: skip those that do nothing.
        flat = x.reshape(-1, k)
        if flat.dtype != torch.bfloat16:
            flat = flat.to(torch.bfloat16)
        padded_n, padded_k = self._padded
        if padded_k != k:
            flat = F.pad(flat, (0, padded_k - k))
        matmul = (
            torch._weight_int4pack_mm_for_cpu
            if self._device.type == "cpu"
            else torch._weight_int4pack_mm
        )
        out = matmul(flat, self._packed, self.group_size, self._kernel_scale_zero)
        if padded_n != n:
            out = out[:, :n]
        if exact_dtype or x.dtype != torch.float32:  # bfloat16 promotes only to float32
            out = out.to(x.dtype)
        out = out.reshape(*x.shape[:-1], n)
        return out if bias is None else out + bias

    def to(self, device: torch.device | str) -> Q4Weight:
        """The same weight on `device` (repacked for that device's kernel)."""
        device = torch.device(device)
        if device.type == self.device.type and device.index in (None, self.device.index):
            return self
        scale, zero = self.scales()
        return Q4Weight(
            self.codes().to(device),
            scale.to(device),
            zero.to(device),
            group_size=self.group_size,
            shape=tuple(self.shape),
        )

    def _pack_for_kernel(self, codes: torch.Tensor) -> bool:
        """Packs the codes into the kernel's own layout; False where no kernel serves."""
        device = self.device
        try:
            if device.type == "cpu":
                packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)
            else:
                pairs = codes.to(torch.uint8)
                packed = torch._convert_weight_to_int4pack(
                    (pairs[:, 0::2] << 4) | pairs[:, 1::2], 8
                )
        except (RuntimeError, NotImplementedError) as exc:
            logger.info("no int4 kernel on %s (%s): dequantizing instead", device, exc)
            self._use_kernel = False
            return False
        self._packed = packed
        # The kernels read the scales as [groups, N, 2], in the activations' dtype.
        assert self._scale_zero is not None
        self._kernel_scale_zero = self._scale_zero.transpose(0, 1).contiguous().bfloat16()
        if device.type == "cpu":
            # The codes can be read back from the CPU layout (`codes`), and the kernel's
            # scales are the ones computed with: keep one copy of each.
            self._scale_zero = None
            return True
        # Elsewhere the plain codes stay (`codes` reads them), and the kernel is checked.
        pairs = codes.to(torch.uint8)
        self._codes = pairs[:, 0::2] | (pairs[:, 1::2] << 4)
        self._use_kernel = self._kernel_verdict()
        return True

    def _kernel_verdict(self) -> bool:
        """`_kernel_agrees`, once per device, group size and shape: a span streamed from
        disk rebuilds its weights on every forward, and the kernel does not change."""
        key = (str(self.device), self.group_size, self._padded)
        verdict = _KERNEL_VERDICTS.get(key)
        if verdict is None:
            verdict = _KERNEL_VERDICTS[key] = self._kernel_agrees()
        return verdict

    def _kernel_agrees(self) -> bool:
        """Whether the device's kernel computes what dequantizing does (the non-CPU
        layouts are not ours to test on every machine): checked once, on load."""
        k = self.shape[1]
        # Its own generator: a load must not move the caller's random stream.
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4, k, generator=generator).to(self.device, torch.bfloat16)
        self._use_kernel = True
        got = self.linear(x, None).float()
        want = F.linear(x.float(), self.dequantize(torch.float32))
        agrees = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))
        if not agrees:
            logger.warning("the int4 kernel on %s disagrees: dequantizing instead", self.device)
        return agrees


def _unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] from two per byte, even k in the low nibble."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


def _kernel_kind(device: torch.device) -> str | None:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return "cuda"
    return None


def _unpack_cpu_kernel_order(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The codes [N, K] of a weight in the CPU kernel's layout (a tiled one, which torch
    does not document): read back through where each code lands, found by packing."""
    order = _cpu_kernel_order(*shape)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten()
    codes = torch.empty_like(nibbles)
    codes[order] = nibbles
    return codes.view(shape)


@functools.lru_cache(maxsize=32)
def _cpu_kernel_order(rows: int, cols: int) -> torch.Tensor:
    """For each nibble of the packed CPU layout (low then high of each byte, in byte
    order), the flat index of the code it holds. Found by packing the index itself,
    four bits at a time."""
    index = torch.arange(rows * cols, dtype=torch.int64)
    order = torch.zeros(rows * cols, dtype=torch.int64)
    digits = max(1, -(-(rows * cols - 1).bit_length() // 4))
    for digit in range(digits):
        plane = ((index >> (4 * digit)) & 0xF).to(torch.int32).view(rows, cols)
        packed = torch._convert_weight_to_int4pack_for_cpu(plane, 8)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten().long()
        order |= nibbles << (4 * digit)
    return order
