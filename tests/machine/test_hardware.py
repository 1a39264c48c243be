"""The hardware profile: real readings of this machine, and NVML's failures in words.

A real NVML needs an NVIDIA GPU, so the GPU paths run against a fake NVML module passed
through `collect_hardware`'s `load_nvml` seam.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import volunteer
from volunteer.machine.hardware import GpuInfo, HardwareProfile, collect_hardware


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """Answers like pynvml for the GPUs given; a query named in `refused` raises NVMLError.

    Args:
        gpus: per GPU, the values of its queries by pynvml function name; a GPU given as
            None refuses to be opened (as without permission).
        refused: (GPU index, pynvml function name) pairs that raise.
        init_error: raised by nvmlInit when set.
    """

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(
        self,
        gpus: list[dict[str, Any] | None],
        refused: frozenset[tuple[int, str]] = frozenset(),
        init_error: str | None = None,
    ) -> None:
        self.gpus = gpus
        self.refused = refused
        self.init_error = init_error
        self.shutdowns = 0
        for name in (
            "nvmlDeviceGetName",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetCudaComputeCapability",
        ):
            setattr(self, name, self._query(name))

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"  # older pynvml versions return bytes

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.gpus[index] is None:
            raise FakeNVMLError("Insufficient Permissions")
        return index

    def _query(self, name: str) -> Any:
        def query(handle: int, *_args: Any) -> Any:
            if (handle, name) in self.refused:
                raise FakeNVMLError("Not Supported")
            gpu = self.gpus[handle]
            assert gpu is not None
            return gpu[name]

        return query


H100 = {
    "nvmlDeviceGetName": "NVIDIA H100 80GB HBM3",
    "nvmlDeviceGetMemoryInfo": SimpleNamespace(total=80 * 1024**3, free=79 * 1024**3),
    "nvmlDeviceGetUtilizationRates": SimpleNamespace(gpu=7, memory=1),
    "nvmlDeviceGetTemperature": 41,
    "nvmlDeviceGetPowerUsage": 71_500,  # milliwatts
    "nvmlDeviceGetCudaComputeCapability": (9, 0),
}


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> HardwareProfile:
    return collect_hardware(tmp_path_factory.mktemp("cache"))


def test_cpu_ram_and_disk_are_read_from_this_machine(profile: HardwareProfile) -> None:
    cpu = profile.cpu
    assert cpu.model_name.strip()
    assert 1 <= cpu.physical_cores <= cpu.logical_cores
    for mhz in (cpu.max_freq_mhz, cpu.current_freq_mhz):
        assert mhz is None or mhz > 0
    assert profile.ram_total_bytes > profile.ram_available_bytes > 0
    assert profile.disk.free_bytes is not None and profile.disk.free_bytes > 0
    assert profile.disk.total_bytes is not None
    assert profile.disk.total_bytes >= profile.disk.free_bytes
    assert profile.package_version == volunteer.__version__
    assert profile.accelerators.torch_version == str(torch.__version__)


def test_no_gpu_here_is_said_in_words(profile: HardwareProfile) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    acc = profile.accelerators
    assert acc.gpus == ()
    assert not acc.has_cuda
    assert acc.nvml_status.startswith("NVML not available") or "no NVIDIA GPU" in acc.nvml_status


def test_missing_cache_dir_is_measured_at_its_parent_and_not_created(tmp_path: Path) -> None:
    cache = tmp_path / "not" / "yet" / "cache"
    disk = collect_hardware(cache).disk
    assert disk.path == str(tmp_path)
    assert disk.free_bytes is not None and disk.free_bytes > 0
    assert list(tmp_path.iterdir()) == []


def test_missing_pynvml_is_a_note(tmp_path: Path) -> None:
    def no_pynvml() -> Any:
        raise ImportError("No module named 'pynvml'")

    acc = collect_hardware(tmp_path, load_nvml=no_pynvml).accelerators
    assert acc.nvml_status == "NVML not available: the nvidia-ml-py package is not installed"
    assert acc.gpus == ()


def test_nvml_that_fails_to_start_is_a_note(tmp_path: Path) -> None:
    nvml = FakeNVML([H100], init_error="Driver Not Loaded")
    acc = collect_hardware(tmp_path, load_nvml=lambda: nvml).accelerators
    assert acc.nvml_status == "NVML not available: Driver Not Loaded"
    assert (acc.gpus, acc.driver_version) == ((), None)


def test_each_gpu_field_fails_on_its_own(tmp_path: Path) -> None:
    refused = frozenset({(0, "nvmlDeviceGetPowerUsage"), (1, "nvmlDeviceGetTemperature")})
    nvml = FakeNVML([H100, H100, None], refused=refused)
    acc = collect_hardware(tmp_path, load_nvml=lambda: nvml).accelerators
    assert acc.nvml_status == "NVML found 3 NVIDIA GPU(s)"
    assert acc.driver_version == "550.54.15"
    first, second, locked = acc.gpus
    assert first == GpuInfo(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * 1024**3,
        memory_free_bytes=79 * 1024**3,
        utilization_percent=7.0,
        temperature_c=41.0,
        power_w=None,
        compute_capability=(9, 0),
    )
    assert second.temperature_c is None
    assert second.power_w == pytest.approx(71.5)
    assert locked == GpuInfo(index=2, note="cannot query GPU 2: Insufficient Permissions")
    assert nvml.shutdowns == 1


def test_empty_nvml_says_no_gpu(tmp_path: Path) -> None:
    acc = collect_hardware(tmp_path, load_nvml=lambda: FakeNVML([])).accelerators
    assert acc.nvml_status == "NVML works but found no NVIDIA GPU"


def test_json_round_trip(profile: HardwareProfile, tmp_path: Path) -> None:
    with_gpus = collect_hardware(tmp_path, load_nvml=lambda: FakeNVML([H100, None]))
    for original in (profile, with_gpus):
        data = json.loads(json.dumps(original.to_json()))
        assert data == original.to_json()  # already plain JSON types
        assert HardwareProfile.from_json(data) == original
    data = with_gpus.to_json()
    data["from_a_newer_version"] = 1
    data["accelerators"]["gpus"][0]["fan_percent"] = 30
    assert HardwareProfile.from_json(data) == with_gpus


def test_from_json_rejects_a_missing_field(profile: HardwareProfile) -> None:
    data = profile.to_json()
    del data["cpu"]["logical_cores"]
    with pytest.raises(TypeError):
        HardwareProfile.from_json(data)


def test_fingerprint_is_stable_and_follows_the_hardware(
    profile: HardwareProfile, tmp_path: Path
) -> None:
    again = collect_hardware(tmp_path)
    assert again.fingerprint() == profile.fingerprint()
    assert len(profile.fingerprint()) == 16
    int(profile.fingerprint(), 16)
    # Free memory and disk come and go; they are not the hardware.
    drift = dataclasses.replace(profile, ram_available_bytes=1, ram_total_bytes=1024**3)
    same_gib = dataclasses.replace(drift, ram_total_bytes=1024**3 + 1000)
    assert drift.fingerprint() == same_gib.fingerprint()
    changed = [
        dataclasses.replace(profile, cpu=dataclasses.replace(profile.cpu, model_name="Other")),
        dataclasses.replace(profile, cpu=dataclasses.replace(profile.cpu, logical_cores=999)),
        dataclasses.replace(profile, ram_total_bytes=profile.ram_total_bytes + 2 * 1024**3),
        dataclasses.replace(profile, package_version="99.0"),
        dataclasses.replace(profile, python_version="2.7.18"),
        collect_hardware(tmp_path, load_nvml=lambda: FakeNVML([H100])),
    ]
    prints = {profile.fingerprint(), *(other.fingerprint() for other in changed)}
    assert len(prints) == len(changed) + 1
    bigger = {**H100, "nvmlDeviceGetMemoryInfo": SimpleNamespace(total=96 * 1024**3, free=1)}
    assert (
        collect_hardware(tmp_path, load_nvml=lambda: FakeNVML([bigger])).fingerprint()
        != changed[-1].fingerprint()
    )
