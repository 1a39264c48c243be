"""The FlexGen-style offloading policy: its linear program and its cost model."""

from __future__ import annotations

import dataclasses
import random

import pytest
from volunteer.scheduler.offload import NoPolicyError, OffloadPolicy, search_policy, solve_placement
from volunteer.scheduler.offload_cost import Batching, DeviceSpec, TransformerShape, Workload

from bench.flexgen_reference import (
    OPT_6_7B,
    OPT_30B,
    OPT_30B_TOKENS_S,
    OPT_175B,
    T4_MACHINE,
    WORKLOAD,
)

GB = 10**9
GIB = 2**30
T4 = T4_MACHINE
FLEXGEN_LOAD = WORKLOAD
FLEXGEN_OPT_30B_TOKENS_S = OPT_30B_TOKENS_S


def _check_policy(policy: OffloadPolicy, device: DeviceSpec) -> None:
    for place in (policy.weights, policy.cache, policy.activations):
        assert min(place.gpu, place.cpu, place.disk) >= 0
        assert place.gpu + place.cpu + place.disk == pytest.approx(1.0, abs=1e-9)
    capacities = (device.gpu_bytes, device.cpu_bytes, device.disk_bytes)
    for used, capacity in zip(policy.memory_bytes, capacities, strict=True):
        assert used <= capacity * (1 + 1e-6) + 1


def test_opt_30b_on_a_t4_offloads_its_weights_at_flexgens_speed() -> None:
    policy = search_policy(OPT_30B, FLEXGEN_LOAD, T4, allow_compression=False)
    _check_policy(policy, T4)
    assert policy.weights.gpu < 0.5  # 60 GB of weights cannot sit on a 16 GB card
    ratio = policy.tokens_s / FLEXGEN_OPT_30B_TOKENS_S
    assert 0.5 <= ratio <= 2.0, policy.describe()
    assert policy.block_size >= 32  # throughput comes from big effective batches


def test_opt_6_7b_fits_wholly_on_the_t4() -> None:
    policy = search_policy(OPT_6_7B, FLEXGEN_LOAD, T4, allow_compression=False)
    _check_policy(policy, T4)
    assert policy.weights.gpu == pytest.approx(1.0, abs=1e-6), policy.describe()


def test_compression_is_chosen_when_it_pays() -> None:
    plain = search_policy(OPT_175B, FLEXGEN_LOAD, T4, allow_compression=False)
    compressed = search_policy(OPT_175B, FLEXGEN_LOAD, T4)
    _check_policy(compressed, T4)
    assert compressed.compress_weights
    assert compressed.tokens_s > 2 * plain.tokens_s
    assert plain.weights.disk > 0  # 350 GB do not fit in 208 GB of RAM uncompressed
    assert "4-bit: weights" in compressed.describe()


def test_fractions_and_capacities_hold_on_random_machines() -> None:
    rng = random.Random(8)
    for _ in range(6):
        device = _random_device(rng)
        shape = TransformerShape(
            num_layers=rng.choice([24, 32, 40]),
            hidden=rng.choice([2048, 4096, 5120]),
            ffn_hidden=rng.choice([8192, 11008, 13824]),
            num_heads=32,
            num_kv_heads=rng.choice([8, 32]),
        )
        try:
            policy = search_policy(shape, Workload(rng.choice([128, 512]), 32), device)
        except NoPolicyError:
            continue
        _check_policy(policy, device)


def test_more_memory_never_makes_the_predicted_time_worse() -> None:
    rng = random.Random(9)
    for _ in range(5):
        device = _random_device(rng)
        bigger = dataclasses.replace(
            device,
            gpu_bytes=int(device.gpu_bytes * rng.uniform(1, 3)),
            cpu_bytes=int(device.cpu_bytes * rng.uniform(1, 3)),
        )
        small = search_policy(OPT_30B, FLEXGEN_LOAD, device, allow_compression=False)
        large = search_policy(OPT_30B, FLEXGEN_LOAD, bigger, allow_compression=False)
        assert large.seconds_per_token <= small.seconds_per_token * (1 + 1e-9)


def test_a_machine_that_cannot_hold_a_layer_gets_no_policy() -> None:
    tiny = dataclasses.replace(T4, gpu_bytes=GIB // 2)  # not two 4-bit layers
    with pytest.raises(NoPolicyError, match="no placement fits"):
        search_policy(OPT_30B, FLEXGEN_LOAD, tiny)
    assert solve_placement(OPT_30B, FLEXGEN_LOAD, tiny, Batching(1, 1)) is None


def _random_device(rng: random.Random) -> DeviceSpec:
    return dataclasses.replace(
        T4,
        gpu_bytes=int(rng.uniform(8, 80) * GIB),
        cpu_bytes=int(rng.uniform(32, 512) * GIB),
        disk_bytes=int(rng.uniform(100, 2000) * GB),
        ctog_bytes_s=rng.uniform(4, 25) * GB,
        gpu_flops_prefill=rng.uniform(10, 300) * 1e12,
    )
