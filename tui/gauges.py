"""Live machine gauges for the dashboard: CPU, RAM, disk, and NVIDIA GPUs through NVML."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import psutil

from volunteer.machine.hardware import GpuInfo, read_gpus


@dataclasses.dataclass(frozen=True)
class Gauges:
    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    disk_free_bytes: int | None
    disk_total_bytes: int | None
    gpus: tuple[GpuInfo, ...] = ()
    gpu_note: str = ""
    """NVML's status in words (why no GPU shows, when none does)."""


class GaugeReader:
    """Reads the gauges; stops asking NVML once it said it is not there (it will not
    appear while the TUI runs, and each failed start costs a library search)."""

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self._nvml_missing: str | None = None

    def __call__(self) -> Gauges:
        memory = psutil.virtual_memory()
        path = self.disk_path
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            usage = shutil.disk_usage(path)
            disk_free, disk_total = int(usage.free), int(usage.total)
        except OSError:
            disk_free = disk_total = None
        if self._nvml_missing is not None:
            note, gpus = self._nvml_missing, ()
        else:
            note, _, gpus = read_gpus()
            if not gpus and note.startswith("NVML not available"):
                self._nvml_missing = note
        return Gauges(
            cpu_percent=psutil.cpu_percent(interval=None),
            ram_used_bytes=int(memory.total - memory.available),
            ram_total_bytes=int(memory.total),
            disk_free_bytes=disk_free,
            disk_total_bytes=disk_total,
            gpus=gpus,
            gpu_note=note,
        )
