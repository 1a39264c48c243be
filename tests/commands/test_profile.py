"""`volunteer profile`: the measured machine and the daemon's decision, with reasons."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from volunteer.models.config import ModelConfig

from tests.server import tiny_config
from tests.swarm.test_records import make_info
from volunteer.commands.profile_report import decide, device_spec, report_json, report_lines
from volunteer.machine.calibration import DiskReadEstimate
from volunteer.machine.hardware import GpuInfo, HardwareProfile, collect_hardware
from volunteer.machine.microbench import MicroBenchmarks, run_microbenchmarks
from volunteer.settings import Settings
from volunteer.swarm.records import SwarmSnapshot

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
LLAMA_7B = ModelConfig(
    arch="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> tuple[HardwareProfile, MicroBenchmarks]:
    cache = tmp_path_factory.mktemp("cache")
    return collect_hardware(cache), run_microbenchmarks(cache, budget_s=0.5)


def _with_gpu(hardware: HardwareProfile, bench: MicroBenchmarks, free_gib: float):
    """This machine as if it had one CUDA GPU (the GPU path cannot run here for real)."""
    gpu = GpuInfo(index=0, name="Test GPU", memory_total_bytes=int(free_gib * GIB) + GIB,
                  memory_free_bytes=int(free_gib * GIB))  # fmt: skip
    accelerators = dataclasses.replace(
        hardware.accelerators, nvml_status="NVML found 1 NVIDIA GPU(s)", gpus=(gpu,),
        has_cuda=True,
    )  # fmt: skip
    flops = {**bench.matmul_flops, "cuda:0/float16": 60e12}
    bandwidth = {**bench.memory_bandwidth_bytes_per_s, "cuda:0": 1.6e12}
    return (
        dataclasses.replace(hardware, accelerators=accelerators, ram_available_bytes=64 * GIB),
        dataclasses.replace(bench, matmul_flops=flops, memory_bandwidth_bytes_per_s=bandwidth),
    )


def test_this_machine_serves_from_ram_and_says_why(here) -> None:
    hardware, bench = here
    decision = decide(
        hardware=hardware, bench=bench, settings=Settings(), config=tiny_config(12),
        model_name="tiny", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert decision.blocks == (0, 12)
    assert "no server holds any block yet" in decision.blocks_reason
    assert decision.offload is None and "no usable GPU" in decision.offload_reason
    assert "NVML" in decision.offload_reason
    assert device_spec(hardware, bench, Settings()) is None
    text = "\n".join(report_lines(hardware, bench, decision))
    assert "matmul       cpu/float32" in text and "blocks       blocks 0:12" in text
    assert "no peers to ping" in text
    rtts = {"a": 0.004, "b": None, "c": 0.002}
    text = "\n".join(report_lines(hardware, bench, decision, rtts))
    assert "4.0 ms median over 2 of 3 peer(s) (2.0-4.0 ms)" in text
    assert "none of 1 peer(s) answered" in "\n".join(
        report_lines(hardware, bench, decision, {"a": None})
    )
    assert json.loads(json.dumps(report_json(hardware, bench, decision)))["decision"]["blocks"] == [
        0,
        12,
    ]


def test_the_plan_follows_the_swarm_and_the_memory_limit(here) -> None:
    hardware, bench = here
    config = tiny_config(12)
    entries = [(i, "p", make_info(start=0, end=8, throughput=5.0, model="tiny")) for i in range(8)]
    swarm = SwarmSnapshot.build("tiny", 12, entries)
    decision = decide(
        hardware=hardware, bench=bench, settings=Settings(num_blocks=4), config=config,
        model_name="tiny", snapshot=swarm, swarm_source="the daemon",
    )  # fmt: skip
    assert decision.blocks == (8, 12)
    nothing = decide(
        hardware=hardware, bench=bench, settings=Settings(max_ram_gib=0.25), config=config,
        model_name="tiny", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert nothing.blocks is None and "not one block fits" in nothing.blocks_reason


def test_a_gpu_machine_gets_an_offloading_policy(here) -> None:
    hardware, bench = _with_gpu(*here, free_gib=24)
    roomy = decide(
        hardware=hardware, bench=bench, settings=Settings(), config=LLAMA_7B,
        model_name="llama", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert roomy.offload is not None
    assert roomy.offload.weights.gpu == pytest.approx(1.0, abs=1e-6)  # 13.5 GB fit in 24
    small_hardware, small_bench = _with_gpu(*here, free_gib=6)
    tight = decide(
        hardware=small_hardware, bench=small_bench, settings=Settings(), config=LLAMA_7B,
        model_name="llama", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert tight.offload is not None
    placed = tight.offload.weights
    assert placed.gpu < 0.5 or tight.offload.compress_weights  # 13.5 GB cannot all sit in 6
    assert "predicted" in tight.offload_reason


def test_the_gpu_memory_limit_caps_what_the_policy_plans_for(here) -> None:
    hardware, bench = _with_gpu(*here, free_gib=24)
    free = device_spec(hardware, bench, Settings())
    capped = device_spec(hardware, bench, Settings(max_gpu_gib=6))
    assert free is not None and capped is not None
    assert free.gpu_bytes == 24 * GIB and capped.gpu_bytes == 6 * GIB
    above_free = device_spec(hardware, bench, Settings(max_gpu_gib=100))
    assert above_free is not None and above_free.gpu_bytes == 24 * GIB  # a cap, not a claim
    limited = decide(
        hardware=hardware, bench=bench, settings=Settings(max_gpu_gib=6), config=LLAMA_7B,
        model_name="llama", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert limited.offload is not None
    assert limited.offload.weights.gpu < 0.5 or limited.offload.compress_weights
    assert "6 GiB of GPU memory allowed" in limited.offload_reason


def test_a_calibrated_disk_is_what_the_offloading_model_plans_with(here) -> None:
    hardware, bench = _with_gpu(*here, free_gib=6)
    slow = DiskReadEstimate(2e8, "calibrated while serving")
    spec = device_spec(hardware, bench, Settings(), slow)
    assert spec is not None and spec.dtoc_bytes_s == 2e8
    decision = decide(
        hardware=hardware, bench=bench, settings=Settings(), config=LLAMA_7B,
        model_name="llama", snapshot=None, swarm_source="none", disk_read=slow,
    )  # fmt: skip
    assert "disk plan    200 MB/s (calibrated while serving)" in report_lines(
        hardware, bench, decision
    )
    planned = report_json(hardware, bench, decision)["decision"]["disk_read_plan"]
    assert planned == {"bytes_s": 2e8, "origin": "calibrated while serving"}


@pytest.mark.slow
def test_the_profile_command_prints_json_and_text(tmp_path: Path, smollm2_folder: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    env["VOLUNTEER_CACHE_DIR"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "volunteer", "--home", str(tmp_path / "home"), "profile"]
    command += ["--model", str(smollm2_folder)]
    first = subprocess.run(
        [*command, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["hardware"]["accelerators"]["has_cuda"] is False
    assert report["benchmarks"]["block_throughput"] > 0
    assert report["decision"]["blocks"] == [0, 30]
    assert "no daemon runs here" in report["decision"]["swarm_source"]
    assert (tmp_path / "cache" / "profile" / "microbench.json").is_file()
    text = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "blocks       blocks 0:30 because" in text.stdout
    assert "no usable GPU" in text.stdout
