"""FlexGen's cost model: the time of one transformer layer when weights, attention cache
and activations are split between GPU, CPU and disk.

Generation runs in FlexGen's zig-zag order: a "block" of `gpu_batch_size *
num_gpu_batches` sequences goes through one layer at a time, so each layer's weights
cross from CPU or disk once per block, however many sequences it holds. Transfers in
each direction and the compute of a layer overlap, so a layer takes as long as its
slowest part. With the cache off the GPU, attention runs on the CPU next to it (only
the small query and new keys/values cross), as FlexGen does.

Every time here is linear in the placement fractions, which is what lets
`volunteer.scheduler.offload` search them with a linear program.

The GPU tiers feed `volunteer.scheduler.offload`, whose policy `volunteer profile`
reports; the disk tier (`disk_tier_step_s`) is what a daemon streaming a span from disk
checks itself against, and calibrates from (`volunteer.daemon.offload_check`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

COMPRESSED_RATIO = (4 + 2 * 16 / 64) / 16
"""4-bit group-wise compression of 16-bit values (groups of 64, an fp16 scale and
minimum each): 0.28 of the bytes."""


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """What the cost model needs of a decoder-only transformer."""

    num_layers: int
    hidden: int
    ffn_hidden: int
    num_heads: int
    num_kv_heads: int
    bytes_per_value: int = 2
    """Weights and cache as stored uncompressed (2: fp16/bf16)."""
    is_gated_mlp: bool = True
    """Llama-style gate/up/down MLP (3 matrices); OPT-style has 2."""

    @property
    def kv_hidden(self) -> int:
        return self.hidden * self.num_kv_heads // self.num_heads

    @property
    def params_per_layer(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_hidden
        mlp = (3 if self.is_gated_mlp else 2) * self.hidden * self.ffn_hidden
        return attention + mlp

    @classmethod
    def of(cls, config: Any, **options: Any) -> TransformerShape:
        """The shape of a model config (`volunteer.models.config.ModelConfig`: read by its
        attributes, this layer imports no model code)."""
        return cls(
            num_layers=config.num_layers,
            hidden=config.hidden_size,
            ffn_hidden=config.intermediate_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            **options,
        )

    @classmethod
    def opt(cls, *, num_layers: int, hidden: int, num_heads: int) -> TransformerShape:
        return cls(num_layers, hidden, 4 * hidden, num_heads, num_heads, is_gated_mlp=False)


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt_len: int
    gen_len: int


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Capacities and speeds of one machine, calibrated from its profile."""

    gpu_bytes: int
    cpu_bytes: int
    disk_bytes: int
    ctog_bytes_s: float
    """CPU -> GPU copies."""
    gtoc_bytes_s: float
    dtoc_bytes_s: float
    """Disk reads into CPU memory."""
    ctod_bytes_s: float
    gpu_flops_prefill: float
    """Matmul FLOP/s of the GPU on prefill-sized (large) matrices."""
    gpu_flops_decode: float
    """Matmul FLOP/s on decode-sized matrices (one token per sequence)."""
    gpu_attention_flops: float
    cpu_attention_flops: float
    """Effective FLOP/s of attention on the CPU (memory-bound in practice)."""
    gpu_memory_bytes_s: float = 300e9
    """GPU memory bandwidth: each GPU batch reads the layer's weights once."""
    dequant_bytes_s: float = 200e9
    """Bytes of decompressed 16-bit values the GPU produces per second."""


@dataclasses.dataclass(frozen=True)
class Batching:
    gpu_batch_size: int
    num_gpu_batches: int
    compress_weights: bool = False
    compress_cache: bool = False

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


@dataclasses.dataclass(frozen=True)
class LayerSizes:
    """Bytes and FLOPs of one layer for one block of sequences."""

    weights: float
    cache_total: float
    """The layer's cache for every position of every sequence of the block."""
    cache_read_decode: float
    """Cache read by one decode step, averaged over the generation."""
    kv_new_prefill: float
    kv_new_decode: float
    act_prefill: float
    act_decode: float
    flops_prefill: float
    flops_decode: float
    attention_flops_prefill: float
    attention_flops_decode: float
    gpu_work_bytes: float
    """Scratch of one GPU batch at its prefill peak (MLP input and attention scores)."""

    @classmethod
    def of(cls, shape: TransformerShape, load: Workload, batching: Batching) -> LayerSizes:
        s, n, b = load.prompt_len, load.gen_len, batching.block_size
        value = shape.bytes_per_value
        weight_ratio = COMPRESSED_RATIO if batching.compress_weights else 1.0
        cache_ratio = COMPRESSED_RATIO if batching.compress_cache else 1.0
        kv = 2 * shape.kv_hidden * value * cache_ratio  # one position of one sequence
        params = shape.params_per_layer
        gbs = batching.gpu_batch_size
        return cls(
            weights=params * value * weight_ratio,
            cache_total=b * (s + n) * kv,
            cache_read_decode=b * (s + n / 2) * kv,
            kv_new_prefill=b * s * kv,
            kv_new_decode=b * kv,
            act_prefill=b * s * shape.hidden * value,
            act_decode=b * shape.hidden * value,
            flops_prefill=2 * b * s * params,
            flops_decode=2 * b * params,
            attention_flops_prefill=4 * b * s * s * shape.hidden,
            attention_flops_decode=4 * b * (s + n / 2) * shape.hidden,
            gpu_work_bytes=gbs * s * (4 * shape.hidden + shape.ffn_hidden) * value
            + gbs * shape.num_heads * s * s * value,
        )


def disk_tier_step_s(weight_bytes: int, read_bytes_s: float, compute_s: float) -> float:
    """One decode step of a span whose weights stream from disk into RAM (the tier a
    CPU-only machine runs, `volunteer.models.offload`): every step reads all the
    weights, the next block while this one computes, so the slower of reading and
    computing sets the pace (FlexGen's overlapped schedule, one tier deep)."""
    return max(weight_bytes / read_bytes_s, compute_s)


def calibrated_read_bytes_s(weight_bytes: int, measured_step_s: float) -> float:
    """The read bandwidth a measured step of the disk tier shows: what the cost model
    should use for this disk next time (reads slower than the disk's bench, from the
    allocator say, show up here). No step is shorter than its reads, so this is the
    rate itself where the step was read-bound, and a lower bound where it was not."""
    return weight_bytes / measured_step_s
