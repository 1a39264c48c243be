"""What this machine has: CPU, RAM, the model cache's disk, NVIDIA GPUs, torch backends.

`collect_hardware` never raises for a missing or broken part: no NVML library, no GPU, a
GPU we may not query, an unreadable /proc/cpuinfo. Each becomes a plain-words note (or a
None field) so `volunteer profile` can show it and the scheduler can plan around it.
torch and pynvml are imported inside the functions that need them, so importing this
module stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

import volunteer

GIB = 1024**3
FINGERPRINT_HEX_CHARS = 16


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model_name: str
    """As the OS names it, or "unknown CPU"."""
    physical_cores: int
    logical_cores: int
    max_freq_mhz: float | None
    current_freq_mhz: float | None


@dataclasses.dataclass(frozen=True)
class DiskInfo:
    path: str
    """The folder measured: the cache dir, or its nearest existing parent."""
    free_bytes: int | None
    total_bytes: int | None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it; a field NVML refused to give is None."""

    index: int
    name: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    compute_capability: tuple[int, int] | None = None
    """(major, minor), as CUDA numbers it."""
    note: str | None = None
    """Why this GPU could not be queried at all (e.g. no permission)."""


@dataclasses.dataclass(frozen=True)
class Accelerators:
    nvml_status: str
    """One line: how many NVIDIA GPUs NVML saw, or why NVML is not available."""
    driver_version: str | None
    gpus: tuple[GpuInfo, ...]
    torch_version: str | None
    has_cuda: bool
    """torch can run on CUDA here."""
    has_mps: bool
    """torch can run on Apple's Metal (MPS) here."""


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    cpu: CpuInfo
    ram_total_bytes: int
    ram_available_bytes: int
    disk: DiskInfo
    accelerators: Accelerators
    python_version: str
    package_version: str
    """`volunteer.__version__`."""

    def to_json(self) -> dict[str, Any]:
        """The profile as plain JSON types (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HardwareProfile:
        """Reads `to_json`'s output back; unknown keys are ignored.

        Raises:
            KeyError, TypeError, ValueError: a required field is missing or malformed.
        """
        acc = data["accelerators"]
        gpus = tuple(_gpu_from_json(gpu) for gpu in acc["gpus"])
        return cls(
            cpu=_known(CpuInfo, data["cpu"]),
            disk=_known(DiskInfo, data["disk"]),
            accelerators=_known(Accelerators, {**acc, "gpus": gpus}),
            **_known_fields(cls, data, skip=("cpu", "disk", "accelerators")),
        )

    def fingerprint(self) -> str:
        """A short hex digest of what benchmark results depend on.

        It changes with the CPU model, core counts, total RAM (rounded to GiB: the memory
        firmware reserves varies a little between boots), GPU names and memory, whether
        CUDA/MPS are usable, and the torch, Python and volunteer versions; free memory and
        disk space do not count.
        """
        cpu, acc = self.cpu, self.accelerators
        key = {
            "cpu": [cpu.model_name, cpu.physical_cores, cpu.logical_cores],
            "ram_gib": round(self.ram_total_bytes / GIB),
            "gpus": [[gpu.name, gpu.memory_total_bytes] for gpu in acc.gpus],
            "backends": [acc.has_cuda, acc.has_mps],
            "torch": acc.torch_version,
            "python": self.python_version,
            "volunteer": self.package_version,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
        return digest.hexdigest()[:FINGERPRINT_HEX_CHARS]


def collect_hardware(
    cache_dir: Path, *, load_nvml: Callable[[], Any] | None = None
) -> HardwareProfile:
    """Profiles this machine; creates nothing and never raises for missing hardware.

    Args:
        cache_dir: the model cache; its free space (or its nearest existing parent's) is
            what counts for models.
        load_nvml: returns the `pynvml` module (a seam: tests pass a fake NVML, since a
            real one needs a GPU); None imports `pynvml`.
    """
    memory = psutil.virtual_memory()
    nvml_status, driver, gpus = _nvml_gpus(load_nvml or _import_pynvml)
    torch_version, has_cuda, has_mps = _torch_backends()
    accelerators = Accelerators(nvml_status, driver, gpus, torch_version, has_cuda, has_mps)
    return HardwareProfile(
        cpu=_cpu_info(),
        ram_total_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        disk=_disk_info(cache_dir),
        accelerators=accelerators,
        python_version=platform.python_version(),
        package_version=volunteer.__version__,
    )


def _cpu_info() -> CpuInfo:
    logical = psutil.cpu_count(logical=True) or 1
    max_mhz = current_mhz = None
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, RuntimeError):
        # Some VMs and containers expose no cpufreq at all, and psutil says so by raising.
        freq = None
    if freq is not None:
        # psutil reports 0.0 for a frequency it could not read.
        max_mhz = float(freq.max) or None
        current_mhz = float(freq.current) or None
    return CpuInfo(
        model_name=_cpu_model_name(),
        physical_cores=psutil.cpu_count(logical=False) or logical,
        logical_cores=logical,
        max_freq_mhz=max_mhz,
        current_freq_mhz=current_mhz,
    )


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                # "model name" on x86; ARM boards name the chip in "Hardware" or "Model".
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        command = ["sysctl", "-n", "machdep.cpu.brand_string"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(command, capture_output=True, text=True, timeout=2.0)
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _disk_info(cache_dir: Path) -> DiskInfo:
    path = cache_dir.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return DiskInfo(str(path), None, None, note=f"cannot read free space: {exc}")
    return DiskInfo(str(path), int(usage.free), int(usage.total))


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


def read_gpus(
    load_nvml: Callable[[], Any] | None = None,
) -> tuple[str, str | None, tuple[GpuInfo, ...]]:
    """NVML's status in words, the driver version, and each NVIDIA GPU's readings now
    (light: the TUI polls it every second). Never raises for missing hardware."""
    return _nvml_gpus(load_nvml or _import_pynvml)


def _nvml_gpus(load_nvml: Callable[[], Any]) -> tuple[str, str | None, tuple[GpuInfo, ...]]:
    try:
        nvml = load_nvml()
    except ImportError:
        return "NVML not available: the nvidia-ml-py package is not installed", None, ()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        # The usual case without an NVIDIA driver: "NVML Shared Library Not Found".
        return f"NVML not available: {exc}", None, ()
    try:
        driver = _nvml_field(nvml, nvml.nvmlSystemGetDriverVersion)
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            return f"NVML could not count the GPUs: {exc}", driver, ()
        gpus = tuple(_gpu_info(nvml, index) for index in range(count))
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    if not gpus:
        return "NVML works but found no NVIDIA GPU", driver, ()
    return f"NVML found {len(gpus)} NVIDIA GPU(s)", driver, gpus


def _gpu_info(nvml: Any, index: int) -> GpuInfo:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        return GpuInfo(index, note=f"cannot query GPU {index}: {exc}")
    memory = _nvml_field(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
    util = _nvml_field(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    temp = _nvml_field(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    power_mw = _nvml_field(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
    capability = _nvml_field(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
    return GpuInfo(
        index=index,
        name=_nvml_field(nvml, nvml.nvmlDeviceGetName, handle),
        memory_total_bytes=int(memory.total) if memory is not None else None,
        memory_free_bytes=int(memory.free) if memory is not None else None,
        utilization_percent=float(util.gpu) if util is not None else None,
        temperature_c=float(temp) if temp is not None else None,
        power_w=power_mw / 1000.0 if power_mw is not None else None,
        compute_capability=(int(capability[0]), int(capability[1])) if capability else None,
    )


def _nvml_field(nvml: Any, getter: Callable[..., Any], *args: Any) -> Any:
    # Consumer GPUs and restricted containers refuse single queries (power, utilisation):
    # that field is unknown, the GPU is still usable.
    try:
        value = getter(*args)
    except nvml.NVMLError:
        return None
    # Older pynvml versions return bytes for strings.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _torch_backends() -> tuple[str | None, bool, bool]:
    try:
        import torch
    except ImportError:
        return None, False, False
    try:
        has_cuda = bool(torch.cuda.is_available())
    except RuntimeError:
        has_cuda = False
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    return str(torch.__version__), has_cuda, has_mps


def _gpu_from_json(data: dict[str, Any]) -> GpuInfo:
    capability = data.get("compute_capability")
    cap = (int(capability[0]), int(capability[1])) if capability else None
    return _known(GpuInfo, {**data, "compute_capability": cap})


def _known(cls: Any, data: dict[str, Any]) -> Any:
    return cls(**_known_fields(cls, data))


def _known_fields(cls: Any, data: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    # Newer versions may add fields; an older reader ignores what it does not know.
    names = {field.name for field in dataclasses.fields(cls)} - set(skip)
    return {name: value for name, value in data.items() if name in names}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
