"""`volunteer profile`: this machine, measured, and what the daemon would decide, with why.

The span is the daemon's own decision (`volunteer.daemon.span_plan`) fed the same inputs:
the hardware profile, the cached micro-benchmarks, the settings, and the swarm as the local
daemon sees it (or an empty swarm when no daemon runs, which is what a first `volunteer
start` would find). The offloading policy (`volunteer.scheduler.offload`) and the role
(`volunteer.scheduler.role`) are what the scheduler would choose; the daemon does not act
on them yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import psutil

from volunteer.daemon.ram_room import RamRoom, room_within_cap
from volunteer.daemon.span_plan import GIB, NotEnoughMemoryError, memory_budget, plan_span
from volunteer.machine.calibration import DEFAULT_DISK_READ_BYTES_S, DiskReadEstimate
from volunteer.machine.hardware import HardwareProfile
from volunteer.machine.microbench import MicroBenchmarks
from volunteer.machine.owner_sensors import tree_rss_bytes
from volunteer.machine.weight_choice import fastest_format, resolve_format
from volunteer.models.config import ModelConfig
from volunteer.scheduler.offload import NoPolicyError, OffloadPolicy, search_policy
from volunteer.scheduler.offload_cost import DeviceSpec, TransformerShape, Workload
from volunteer.scheduler.role import WANTED_BLOCK_TPS, RoleInputs, choose_role
from volunteer.settings import Settings
from volunteer.swarm.records import SwarmSnapshot

SERVING_LOAD = Workload(prompt_len=512, gen_len=128)
"""A typical chat turn: what a serving GPU's offloading policy is sized for."""
PCIE_BYTES_S = 12e9
"""Host-to-GPU copies (PCIe 3.0 x16 as measured in practice); not benchmarked yet."""
GPU_BYTES_PER_VALUE = 2
"""Blocks on a GPU are served in 16 bits."""


@dataclasses.dataclass(frozen=True)
class Decision:
    blocks: tuple[int, int] | None
    blocks_reason: str
    weights: str
    """The form the weights are held in (a `WeightFormat` label)."""
    weights_reason: str
    offload: OffloadPolicy | None
    offload_reason: str
    role: str
    role_reason: str
    swarm_source: str
    disk_read: DiskReadEstimate | None = None
    """The disk read rate the cost model planned with (None: the bench's figure)."""


def decide(
    *,
    hardware: HardwareProfile,
    bench: MicroBenchmarks,
    settings: Settings,
    config: ModelConfig,
    model_name: str,
    snapshot: SwarmSnapshot | None,
    swarm_source: str,
    disk_read: DiskReadEstimate | None = None,
) -> Decision:
    """What the daemon would do on this machine now, in plain words.

    Args:
        snapshot: the swarm as a running daemon sees it; None for an empty one.
        swarm_source: where `snapshot` came from, for the report.
        disk_read: the read rate to plan with where a daemon calibrated it
            (`volunteer.machine.calibration`); otherwise the bench's.
    """
    swarm = snapshot or SwarmSnapshot.build(model_name, config.num_layers, [])
    if settings.dtype == "auto":
        choice = fastest_format()
        fmt, weights_reason = choice.fmt, choice.reason
    else:
        fmt = resolve_format(settings.dtype)
        weights_reason = f"{fmt.label}, as set (--dtype)"
    blocks: tuple[int, int] | None = None
    room = _ram_room(hardware, settings)
    if settings.num_blocks == 0:
        blocks_reason = "no blocks: --num-blocks 0 (a bootstrap peer and chat client only)"
    else:
        try:
            plan = plan_span(
                config,
                settings,
                model_name=model_name,
                available_bytes=room.available_bytes,
                snapshot=swarm,
                fmt=fmt,
            )
            blocks, blocks_reason = (plan.start, plan.end), plan.reason
            if room.note:
                blocks_reason += f"; {room.note}"
        except NotEnoughMemoryError as exc:
            blocks_reason = f"no blocks: {exc}"
    offload, offload_reason = _offload(hardware, bench, settings, config, disk_read)
    per_block = swarm.block_throughput()
    role = choose_role(
        RoleInputs(
            is_serving_allowed=settings.num_blocks != 0,
            is_training_allowed=settings.train,
            weakest_block_tps=min(per_block) if per_block else 0.0,
            wanted_block_tps=WANTED_BLOCK_TPS,
            has_training_swarm=False,
        )
    )
    return Decision(
        blocks=blocks,
        blocks_reason=blocks_reason,
        weights=fmt.label,
        weights_reason=weights_reason,
        offload=offload,
        offload_reason=offload_reason,
        role=role.kind.value,
        role_reason=role.reason,
        swarm_source=swarm_source,
        disk_read=disk_read,
    )


def _ram_room(hardware: HardwareProfile, settings: Settings) -> RamRoom:
    """The free RAM within the owner's cap, this process standing in for the daemon."""
    return room_within_cap(
        settings,
        free_bytes=hardware.ram_available_bytes,
        total_bytes=hardware.ram_total_bytes,
        held_bytes=tree_rss_bytes(psutil.Process()),
    )


def device_spec(
    hardware: HardwareProfile,
    bench: MicroBenchmarks,
    settings: Settings,
    disk_read: DiskReadEstimate | None = None,
) -> DeviceSpec | None:
    """The offloading cost model's view of this machine; None without a usable GPU."""
    gpus = [g for g in hardware.accelerators.gpus if g.memory_free_bytes]
    flops = bench.matmul_flops.get("cuda:0/float16") or bench.matmul_flops.get("cuda:0/bfloat16")
    if not hardware.accelerators.has_cuda or not gpus or not flops:
        return None
    cpu_bandwidth = bench.memory_bandwidth_bytes_per_s.get("cpu", 10e9) / 2  # reads only
    if disk_read is None:
        disk_read = DiskReadEstimate(
            bench.disk_read_bytes_per_s or DEFAULT_DISK_READ_BYTES_S, "the profile's disk bench"
        )
    gpu_bytes = int(gpus[0].memory_free_bytes or 0)
    if settings.max_gpu_gib is not None:
        gpu_bytes = min(gpu_bytes, int(settings.max_gpu_gib * GIB))
    ram_bytes = _ram_room(hardware, settings).available_bytes
    return DeviceSpec(
        gpu_bytes=gpu_bytes,
        cpu_bytes=memory_budget(settings, ram_bytes).usable_bytes,
        disk_bytes=int(hardware.disk.free_bytes or 0),
        ctog_bytes_s=PCIE_BYTES_S,
        gtoc_bytes_s=PCIE_BYTES_S,
        dtoc_bytes_s=disk_read.bytes_s,
        ctod_bytes_s=disk_read.bytes_s / 2,
        gpu_flops_prefill=flops,
        gpu_flops_decode=flops / 5,  # one token per sequence: small, memory-bound products
        gpu_attention_flops=flops / 2,
        # Attention over a cache in RAM reads ~1 byte per FLOP (fp16 K/V, 2 FLOPs each).
        cpu_attention_flops=cpu_bandwidth,
        gpu_memory_bytes_s=bench.memory_bandwidth_bytes_per_s.get("cuda:0", 300e9) / 2,
    )


def _offload(
    hardware: HardwareProfile,
    bench: MicroBenchmarks,
    settings: Settings,
    config: ModelConfig,
    disk_read: DiskReadEstimate | None,
) -> tuple[OffloadPolicy | None, str]:
    spec = device_spec(hardware, bench, settings, disk_read)
    if spec is None:
        why = hardware.accelerators.nvml_status
        return (
            None,
            f"weights, cache and activations 100% in RAM, run on the CPU: no usable GPU ({why})",
        )
    shape = TransformerShape.of(config, bytes_per_value=GPU_BYTES_PER_VALUE)
    try:
        policy = search_policy(shape, SERVING_LOAD, spec)
    except NoPolicyError as exc:
        return None, f"no offloading policy fits: {exc}"
    reason = f"{policy.describe()} (the fastest split the cost model finds"
    if settings.max_gpu_gib is not None:
        reason += f" in the {settings.max_gpu_gib:g} GiB of GPU memory allowed"
    return policy, reason + ")"


def report_json(
    hardware: HardwareProfile,
    bench: MicroBenchmarks,
    decision: Decision,
    peer_rtts: Mapping[str, float | None] | None = None,
) -> dict[str, Any]:
    offload, disk_read = decision.offload, decision.disk_read
    return {
        "hardware": hardware.to_json(),
        "benchmarks": bench.to_json(),
        "peer_rtt_s": dict(peer_rtts or {}),
        "fingerprint": hardware.fingerprint(),
        "decision": {
            "blocks": list(decision.blocks) if decision.blocks else None,
            "blocks_reason": decision.blocks_reason,
            "weights": decision.weights,
            "weights_reason": decision.weights_reason,
            "offload": dataclasses.asdict(offload) if offload else None,
            "offload_reason": decision.offload_reason,
            "disk_read_plan": dataclasses.asdict(disk_read) if disk_read else None,
            "role": decision.role,
            "role_reason": decision.role_reason,
            "swarm_source": decision.swarm_source,
        },
    }


def report_lines(
    hardware: HardwareProfile,
    bench: MicroBenchmarks,
    decision: Decision,
    peer_rtts: Mapping[str, float | None] | None = None,
) -> list[str]:
    """The report as text lines for a terminal."""
    cpu, acc = hardware.cpu, hardware.accelerators
    freq = f", {cpu.max_freq_mhz:.0f} MHz" if cpu.max_freq_mhz else ""
    lines = [
        f"cpu          {cpu.model_name} ({cpu.physical_cores} cores, "
        f"{cpu.logical_cores} threads{freq})",
        f"ram          {_gib(hardware.ram_available_bytes)} of "
        f"{_gib(hardware.ram_total_bytes)} free",
        f"disk         {_gib(hardware.disk.free_bytes)} free at {hardware.disk.path}",
        f"gpu          {acc.nvml_status}; CUDA {'usable' if acc.has_cuda else 'not usable'}, "
        f"MPS {'usable' if acc.has_mps else 'not usable'}",
    ]
    for gpu in acc.gpus:
        lines.append(
            f"  gpu {gpu.index}      {gpu.name or '?'}: {_gib(gpu.memory_free_bytes)} of "
            f"{_gib(gpu.memory_total_bytes)} free, {_maybe(gpu.utilization_percent, '%')} busy, "
            f"{_maybe(gpu.temperature_c, ' C')}, {_maybe(gpu.power_w, ' W')}"
            + (f" ({gpu.note})" if gpu.note else "")
        )
    for key, flops in sorted(bench.matmul_flops.items()):
        lines.append(f"matmul       {key}: {flops / 1e9:.1f} GFLOP/s")
    for device, bandwidth in sorted(bench.memory_bandwidth_bytes_per_s.items()):
        lines.append(f"memory       {device}: {bandwidth / 1e9:.1f} GB/s")
    disk_read = bench.disk_read_bytes_per_s
    cached = " (page cache: overstates the disk)" if bench.is_disk_read_page_cache_bound else ""
    lines.append(
        f"disk read    {disk_read / 1e6:.0f} MB/s{cached}"
        if disk_read
        else f"disk read    not measured ({bench.disk_note})"
    )
    planned = decision.disk_read
    if planned is not None and planned.bytes_s != disk_read:
        lines.append(f"disk plan    {planned.bytes_s / 1e6:.0f} MB/s ({planned.origin})")
    if bench.block_throughput:
        lines.append(
            f"block speed  {bench.block_throughput:.1f} tokens/s per block (one-token decode), "
            f"{bench.block_forward_throughput or 0:.0f} tokens/s per block (batch forward)"
        )
    lines.append(_rtt_line(peer_rtts or {}))
    lines += [
        "",
        f"swarm        {decision.swarm_source}",
        f"blocks       {decision.blocks_reason}",
        f"weights      {decision.weights_reason}",
        f"placement    {decision.offload_reason}",
        f"role         {decision.role}: {decision.role_reason}",
    ]
    return lines


def _rtt_line(peer_rtts: Mapping[str, float | None]) -> str:
    answered = sorted(rtt for rtt in peer_rtts.values() if rtt is not None)
    if not peer_rtts:
        return "peer rtt     no peers to ping (no daemon, or an empty swarm)"
    if not answered:
        return f"peer rtt     none of {len(peer_rtts)} peer(s) answered"
    middle = answered[len(answered) // 2]
    return (
        f"peer rtt     {middle * 1000:.1f} ms median over {len(answered)} of "
        f"{len(peer_rtts)} peer(s) ({answered[0] * 1000:.1f}-{answered[-1] * 1000:.1f} ms)"
    )


def _gib(count: int | None) -> str:
    return "?" if count is None else f"{count / 2**30:.1f} GiB"


def _maybe(value: float | None, unit: str) -> str:
    return "?" if value is None else f"{value:.0f}{unit}"
