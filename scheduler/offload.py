"""The offloading policy (FlexGen): where weights, cache and activations live, and how
many sequences run together, for the most tokens per second a machine can generate.

For each batching choice (GPU batch size, number of GPU batches, 4-bit compression of
weights and of the cache, enumerated on a fixed grid) a linear program over the nine
placement fractions and the per-layer prefill and decode times minimises the block's
total time under the GPU, CPU and disk capacities (`volunteer.scheduler.offload_cost` holds the
times). The best throughput over the grid wins. The grid does not depend on the
capacities, so a machine with more memory never gets a slower policy.

Not acted on yet: `volunteer profile` reports the policy; the daemon serves from memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from scipy.optimize import linprog
from volunteer.scheduler.offload_cost import (
    Batching,
    DeviceSpec,
    LayerSizes,
    TransformerShape,
    Workload,
)

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NUM_GPU_BATCHES = (1, 2, 4, 8, 16, 32)
TIE_BREAK_S = 1e-9

# Variable order of the linear program: placement fractions, then per-layer times.
WG, WC, WD, CG, CC, CD, HG, HC, HD, T_PRE, T_GEN = range(11)
_GROUPS = ((WG, WC, WD), (CG, CC, CD), (HG, HC, HD))


class NoPolicyError(ValueError):
    """Not even one sequence fits on this machine with any placement."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Shares of one kind of data on each device (they sum to 1)."""

    gpu: float
    cpu: float
    disk: float


@dataclasses.dataclass(frozen=True)
class OffloadPolicy:
    """A plan the model runtime can execute, and the time the cost model predicts."""

    gpu_batch_size: int
    num_gpu_batches: int
    weights: Placement
    cache: Placement
    activations: Placement
    compress_weights: bool
    compress_cache: bool
    tokens_s: float
    """Generated tokens per second over the whole block."""
    prefill_s: float
    """Prefill of the whole block through all layers."""
    decode_step_s: float
    """One decode step of the whole block through all layers."""
    memory_bytes: tuple[float, float, float]
    """Peak GPU, CPU and disk use of the plan."""

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def seconds_per_token(self) -> float:
        return 1.0 / self.tokens_s

    def describe(self) -> str:
        """The plan in plain words."""

        def split(place: Placement) -> str:
            return f"{place.gpu:.0%} GPU / {place.cpu:.0%} CPU / {place.disk:.0%} disk"

        compressed = [
            name
            for name, used in (("weights", self.compress_weights), ("cache", self.compress_cache))
            if used
        ]
        return (
            f"weights {split(self.weights)}, cache {split(self.cache)}, activations "
            f"{split(self.activations)}; {self.num_gpu_batches} batch(es) of "
            f"{self.gpu_batch_size}; 4-bit: {', '.join(compressed) or 'none'}; "
            f"predicted {self.tokens_s:.3g} tokens/s"
        )


def search_policy(
    shape: TransformerShape,
    load: Workload,
    device: DeviceSpec,
    *,
    allow_compression: bool = True,
    gpu_batch_sizes: Iterable[int] = GPU_BATCH_SIZES,
    num_gpu_batches: Iterable[int] = NUM_GPU_BATCHES,
) -> OffloadPolicy:
    """The policy with the highest predicted throughput (see the module docstring).

    Raises:
        NoPolicyError: no batching on the grid fits the machine's memory.
    """
    compression = (False, True) if allow_compression else (False,)
    choices = [
        (_throughput_ceiling(shape, load, device, batching), index, batching)
        for index, batching in enumerate(
            Batching(gbs, ngb, compress_weights, compress_cache)
            for compress_weights in compression
            for compress_cache in compression
            for gbs in gpu_batch_sizes
            for ngb in num_gpu_batches
        )
    ]
    # Most promising first; a batching whose ceiling cannot beat the best found so far
    # is skipped unsolved (exact pruning: the answer is the same as solving them all).
    choices.sort(key=lambda choice: (-choice[0], choice[1]))
    best: OffloadPolicy | None = None
    for ceiling, _, batching in choices:
        if best is not None and ceiling <= best.tokens_s:
            break
        policy = solve_placement(shape, load, device, batching)
        if policy is not None and (best is None or policy.tokens_s > best.tokens_s):
            best = policy
    if best is None:
        raise NoPolicyError(
            f"no placement fits: {device.gpu_bytes / 2**30:.1f} GiB GPU, "
            f"{device.cpu_bytes / 2**30:.1f} GiB CPU, {device.disk_bytes / 2**30:.1f} GiB disk"
        )
    return best


def solve_placement(
    shape: TransformerShape, load: Workload, device: DeviceSpec, batching: Batching
) -> OffloadPolicy | None:
    """The fastest placement for one batching choice, or None when none fits."""
    sizes = LayerSizes.of(shape, load, batching)
    upper, upper_bounds, equal, equal_bounds = _constraints(shape, sizes, device, batching)
    cost = np.zeros(11)
    cost[T_PRE] = shape.num_layers
    cost[T_GEN] = shape.num_layers * (load.gen_len - 1)
    # Among equally fast placements, prefer the faster tier: a negligible cost per byte
    # share off the GPU, and twice that on disk.
    cost[[WC, CC, HC]] = TIE_BREAK_S
    cost[[WD, CD, HD]] = 2 * TIE_BREAK_S
    bounds = [(0.0, 1.0)] * 9 + [(0.0, None)] * 2
    result = linprog(
        cost,
        A_ub=upper,
        b_ub=upper_bounds,
        A_eq=equal,
        b_eq=equal_bounds,
        bounds=bounds,
        method="highs",
    )
    if result.status != 0:
        return None
    x = result.x
    total_s = float(cost[[T_PRE, T_GEN]] @ x[[T_PRE, T_GEN]])
    placements = [_placement(x, group) for group in _GROUPS]
    return OffloadPolicy(
        gpu_batch_size=batching.gpu_batch_size,
        num_gpu_batches=batching.num_gpu_batches,
        weights=placements[0],
        cache=placements[1],
        activations=placements[2],
        compress_weights=batching.compress_weights,
        compress_cache=batching.compress_cache,
        tokens_s=batching.block_size * load.gen_len / total_s,
        prefill_s=shape.num_layers * float(x[T_PRE]),
        decode_step_s=shape.num_layers * float(x[T_GEN]),
        memory_bytes=_memory_use(x, shape, sizes),
    )


def _constraints(
    shape: TransformerShape, sizes: LayerSizes, device: DeviceSpec, batching: Batching
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows: list[dict[int, float]] = []
    limits: list[float] = []

    def at_most(coefficients: dict[int, float], limit: float) -> None:
        rows.append(coefficients)
        limits.append(limit)

    def takes(time_var: int, terms: dict[int, float], constant: float = 0.0) -> None:
        """The layer time `time_var` is at least sum(terms) + constant."""
        at_most({**terms, time_var: -1.0}, -constant)

    # Prefill: transfers each way, and compute (always on the GPU).
    w, act, kv_new = sizes.weights, sizes.act_prefill, sizes.kv_new_prefill
    takes(T_PRE, _sum({WC: w, WD: w, HC: act, HD: act}, device.ctog_bytes_s))
    takes(T_PRE, _sum({CC: kv_new, CD: kv_new, HC: act, HD: act}, device.gtoc_bytes_s))
    takes(T_PRE, _sum({WD: w, HD: act}, device.dtoc_bytes_s))
    takes(T_PRE, _sum({CD: kv_new, HD: act}, device.ctod_bytes_s))
    prefill_compute_s, decode_compute_s = _compute_floor_s(shape, sizes, device, batching)
    takes(T_PRE, {}, prefill_compute_s)

    # Decode: as prefill, but attention over the cache runs where the cache is.
    act, kv_new, read = sizes.act_decode, sizes.kv_new_decode, sizes.cache_read_decode
    takes(T_GEN, _sum({WC: w, WD: w, HC: act, HD: act}, device.ctog_bytes_s))
    takes(T_GEN, _sum({CC: kv_new, CD: kv_new, HC: act, HD: act}, device.gtoc_bytes_s))
    takes(T_GEN, _sum({WD: w, CD: read, HD: act}, device.dtoc_bytes_s))
    takes(T_GEN, _sum({CD: kv_new, HD: act}, device.ctod_bytes_s))
    attention = sizes.attention_flops_decode
    cache_dequant = (read / device.dequant_bytes_s) if batching.compress_cache else 0.0
    takes(
        T_GEN,
        {
            CG: attention / device.gpu_attention_flops + cache_dequant,
            CC: attention / device.cpu_attention_flops,
            CD: attention / device.cpu_attention_flops,
        },
        decode_compute_s,
    )

    capacities = (device.gpu_bytes, device.cpu_bytes, device.disk_bytes)
    for (coefficients, fixed), capacity in zip(
        _memory_terms(shape, sizes), capacities, strict=True
    ):
        at_most(coefficients, capacity - fixed)

    upper = np.zeros((len(rows), 11))
    for index, coefficients in enumerate(rows):
        for var, value in coefficients.items():
            upper[index, var] += value
    equal = np.zeros((3, 11))
    for index, group in enumerate(_GROUPS):
        equal[index, list(group)] = 1.0
    return upper, np.array(limits), equal, np.ones(3)


def _sum(bytes_by_var: dict[int, float], bytes_s: float) -> dict[int, float]:
    """Seconds per unit of each fraction for data moving at `bytes_s`."""
    return {var: count / bytes_s for var, count in bytes_by_var.items()}


def _compute_floor_s(
    shape: TransformerShape, sizes: LayerSizes, device: DeviceSpec, batching: Batching
) -> tuple[float, float]:
    """A layer's GPU work that no placement avoids, for prefill and for one decode step
    (decode attention, which depends on where the cache is, excluded)."""
    full_weights = shape.params_per_layer * shape.bytes_per_value
    dequant_s = full_weights / device.dequant_bytes_s if batching.compress_weights else 0.0
    # Each GPU batch reads the layer's weights from GPU memory once: at decode that is
    # what bounds the GPU, and what makes bigger GPU batches pay even when all fits.
    weight_reads_s = batching.num_gpu_batches * full_weights / device.gpu_memory_bytes_s
    prefill_s = (
        sizes.flops_prefill / device.gpu_flops_prefill
        + sizes.attention_flops_prefill / device.gpu_attention_flops
        + dequant_s
        + weight_reads_s
    )
    decode_s = sizes.flops_decode / device.gpu_flops_decode + dequant_s + weight_reads_s
    return prefill_s, decode_s


def _throughput_ceiling(
    shape: TransformerShape, load: Workload, device: DeviceSpec, batching: Batching
) -> float:
    """Tokens/s no placement of this batching can beat: its unavoidable compute alone."""
    sizes = LayerSizes.of(shape, load, batching)
    prefill_s, decode_s = _compute_floor_s(shape, sizes, device, batching)
    total_s = shape.num_layers * (prefill_s + (load.gen_len - 1) * decode_s)
    return batching.block_size * load.gen_len / total_s


def _placement(x: np.ndarray, group: tuple[int, int, int]) -> Placement:
    # HiGHS may leave values a hair outside [0, 1]; clip, then make them sum to 1.
    parts = np.clip(x[list(group)], 0.0, 1.0)
    parts = parts / parts.sum()
    # (+ 0.0 turns a clipped -0.0 into 0.0.)
    gpu, cpu, disk = (float(part) + 0.0 for part in parts)
    return Placement(gpu=gpu, cpu=cpu, disk=disk)


def _memory_terms(
    shape: TransformerShape, sizes: LayerSizes
) -> tuple[tuple[dict[int, float], float], ...]:
    """Per device (GPU, CPU, disk): bytes per unit of each fraction, and fixed bytes.

    The GPU also double-buffers the layer being streamed in and holds one GPU batch's
    scratch; the CPU stages what comes from disk.
    """
    w = sizes.weights
    weights_all, cache_all = shape.num_layers * w, shape.num_layers * sizes.cache_total
    hidden_all = 2 * sizes.act_prefill  # the block's hidden states in and out of a layer
    return (
        ({WG: weights_all - 2 * w, CG: cache_all, HG: hidden_all}, 2 * w + sizes.gpu_work_bytes),
        ({WC: weights_all, CC: cache_all, HC: hidden_all, WD: 2 * w}, 0.0),
        ({WD: weights_all, CD: cache_all, HD: hidden_all}, 0.0),
    )


def _memory_use(
    x: np.ndarray, shape: TransformerShape, sizes: LayerSizes
) -> tuple[float, float, float]:
    gpu, cpu, disk = (
        fixed + sum(value * x[var] for var, value in coefficients.items())
        for coefficients, fixed in _memory_terms(shape, sizes)
    )
    return float(gpu), float(cpu), float(disk)
