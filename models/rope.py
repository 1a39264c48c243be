"""Rotary position embeddings (RoPE), with linear and llama3 frequency scaling.

We use the "rotate half" layout of Hugging Face checkpoints: a head's first half of
dimensions pairs with its second half. The cos/sin tables are built once per model for
every position up to the context length, then sliced per step.
"""

from __future__ import annotations

import math

import torch
from volunteer.models.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Per-pair rotation speeds, [head_dim // 2] float32 on the CPU, after context scaling."""
    # On the CPU even inside `with torch.device("meta")` (modules built before loading):
    # meta tensors would hold no values, and their first use costs torch seconds of
    # imports of its Python meta kernels.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    # llama3 keeps fast (short-wavelength) pairs, slows long-wavelength pairs by `factor`,
    # and blends smoothly between the two bands.
    original = scaling.original_max_position_embeddings
    low_freq_wavelen = original / scaling.low_freq_factor
    high_freq_wavelen = original / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryTable(torch.nn.Module):
    """cos and signed sin tables for positions [0, max_positions), [T, 1, head_dim] each.

    The sin table carries the sign of "rotate half" (-sin on the first half), so a
    rotation is x * cos + roll(x) * sin: three elementwise ops per step.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, *, max_positions: int | None = None) -> None:
        super().__init__()
        positions = max_positions or config.max_position_embeddings
        inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        positions_f = torch.arange(positions, dtype=torch.float32, device="cpu")
        angles = torch.outer(positions_f, inv_freq)
        sin = angles.sin()
        # [T, D/2] -> [T, 1, D]: the 1 broadcasts over heads in [B, S, heads, D].
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).unsqueeze(1)
        signed_sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        # Not saved in checkpoints: they are derived from the config.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", signed_sin, persistent=False)

    @property
    def max_positions(self) -> int:
        return int(self.cos.shape[0])

    def slice(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions [start, start + length), [length, 1, D]."""
        end = start + length
        if end > self.max_positions:
            raise ValueError(
                f"position {end - 1} is past the model's context of {self.max_positions}"
            )
        return self.cos[start:end], self.sin[start:end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [B, S, heads, D] by the angles in cos / signed sin [S, 1, D]."""
    # roll by D/2 gives [x2, x1]; with the signed sin this is HF's rotate_half.
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos, rolled, sin)
