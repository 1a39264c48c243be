"""Short, time-bounded micro-benchmarks of this machine, cached per hardware fingerprint.

What the scheduler needs to place work: matmul FLOP/s per device and dtype, memory
bandwidth per device, the model cache's disk read bandwidth, and how fast loaded blocks
run. Each benchmark stops when its `budget_s` is spent (after one measurement at least)
and keeps the best figure it saw: the peak is what the hardware can do, slower runs
measure interference. Results are cached per `HardwareProfile.fingerprint()`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from volunteer.machine.atomic import TMP_PREFIX, write_file_atomic

if TYPE_CHECKING:
    import torch

    from volunteer.models.model import BlockSpan

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 3.0
CACHE_FORMAT = 1
MIB = 1024**2
DISK_FILE_BYTES = 64 * MIB
DISK_CHUNK_BYTES = 4 * MIB
MATMUL_START_N = 256
MATMUL_MAX_N = 4096
MATMUL_GROW_FRACTION = 0.05
"""Grow the matrix while one product takes under this share of the budget (8x per step)."""
BLOCK_DECODE_STEPS = 32
BLOCK_FORWARD_TOKENS = 128
DECODE_TOLERANCE = 0.25
"""Fewer decode threads win unless more are faster by more than this share (1/(1-0.25):
a third). A short measurement on cores other processes share swings by tens of percent
(it can even rank 2 threads faster that then decode slower than 1), while where more
threads truly help, they help by far more; and the cores that fewer threads leave free
serve the rest of the swarm."""
MEMORY_BACKED_FS = frozenset({"tmpfs", "ramfs"})


@dataclasses.dataclass(frozen=True)
class BlockSpeed:
    """How fast a loaded span runs, in tokens/s per block (span speed x its block count)."""

    decode_tokens_per_s: float
    """One token at a time with a KV cache: what inference sessions get."""
    forward_tokens_per_s: float
    """A batch of `BLOCK_FORWARD_TOKENS` tokens at once: prefill and training forward."""


@dataclasses.dataclass(frozen=True)
class DiskRead:
    bytes_per_s: float | None
    is_page_cache_bound: bool
    """The read came (or may have come) from RAM, so it overstates the disk."""
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class MicroBenchmarks:
    matmul_flops: dict[str, float]
    """FLOP/s per "device/dtype", e.g. {"cpu/float32": ..., "cuda:0/float16": ...}."""
    memory_bandwidth_bytes_per_s: dict[str, float]
    """Per device, counting each copied byte twice (read and write)."""
    disk_read_bytes_per_s: float | None
    is_disk_read_page_cache_bound: bool
    disk_note: str | None
    block_throughput: float | None
    """Decode tokens/s per block of the loaded span (`BlockSpeed.decode_tokens_per_s`)."""
    block_forward_throughput: float | None
    """Batch-forward tokens/s per block (`BlockSpeed.forward_tokens_per_s`)."""
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MicroBenchmarks:
        """Reads `to_json`'s output, ignoring unknown keys; raises KeyError, TypeError or
        ValueError on a missing or malformed field."""
        names = {field.name for field in dataclasses.fields(cls)}
        fields = {name: value for name, value in data.items() if name in names}
        for name in ("matmul_flops", "memory_bandwidth_bytes_per_s"):
            fields[name] = {str(key): float(value) for key, value in fields[name].items()}
        return cls(**fields)


def run_microbenchmarks(
    cache_dir: Path, *, budget_s: float = DEFAULT_BUDGET_S, span: BlockSpan | None = None
) -> MicroBenchmarks:
    """Runs every benchmark within about `budget_s` seconds in all.

    Args:
        cache_dir: the model cache, whose disk is measured (created if missing).
        budget_s: seconds for everything together.
        span: loaded blocks to time as well; without them the block fields are None.
    """
    devices = _devices()  # before the clock starts: it imports torch
    began = time.perf_counter()
    combos = [(device, dtype) for device in devices for dtype in _dtypes(device)]
    # Shares of the budget: matmul, memory, disk, blocks.
    shares = (0.4, 0.2, 0.25, 0.15) if span is not None else (0.45, 0.25, 0.3, 0.0)
    flops, bandwidth = {}, {}
    for device, dtype in combos:
        value = measure_matmul_flops(device, dtype, budget_s * shares[0] / len(combos))
        if value is not None:
            flops[f"{device}/{str(dtype).removeprefix('torch.')}"] = value
    for device in devices:
        value = measure_memory_bandwidth(device, budget_s * shares[1] / len(devices))
        if value is not None:
            bandwidth[device] = value
    disk = measure_disk_read(cache_dir, budget_s * shares[2])
    speed = measure_block_speed(span, budget_s * shares[3]) if span is not None else None
    return MicroBenchmarks(
        matmul_flops=flops,
        memory_bandwidth_bytes_per_s=bandwidth,
        disk_read_bytes_per_s=disk.bytes_per_s,
        is_disk_read_page_cache_bound=disk.is_page_cache_bound,
        disk_note=disk.note,
        block_throughput=speed.decode_tokens_per_s if speed else None,
        block_forward_throughput=speed.forward_tokens_per_s if speed else None,
        elapsed_s=time.perf_counter() - began,
    )


def load_or_run(
    cache_file: Path,
    fingerprint: str,
    *,
    cache_dir: Path,
    budget_s: float = DEFAULT_BUDGET_S,
    span: BlockSpan | None = None,
    run: Callable[..., MicroBenchmarks] = run_microbenchmarks,
) -> MicroBenchmarks:
    """The cached results for `fingerprint`, or fresh ones (then saved atomically).

    A missing, unreadable or corrupt cache file, or one for other hardware, is replaced.
    When a span is given, fold the model and span into `fingerprint`: block speed
    depends on them, not only on the hardware.

    Args:
        cache_file: the JSON file holding the last results.
        fingerprint: `HardwareProfile.fingerprint()` (plus the model, with a span).
        cache_dir, budget_s, span: passed to `run` when measuring.
        run: the measuring function (a seam: tests count its calls).
    """
    cached = _read_cache(cache_file, fingerprint)
    if cached is not None:
        return cached
    results = run(cache_dir, budget_s=budget_s, span=span)
    record = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "results": results.to_json()}
    write_file_atomic(cache_file, json.dumps(record, indent=1).encode())
    return results


def _read_cache(cache_file: Path, fingerprint: str) -> MicroBenchmarks | None:
    try:
        record = json.loads(cache_file.read_bytes())
        if record.get("format") != CACHE_FORMAT or record.get("fingerprint") != fingerprint:
            logger.info("benchmark cache %s is for other hardware; measuring again", cache_file)
            return None
        return MicroBenchmarks.from_json(record["results"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring corrupt benchmark cache %s (%r); measuring again", cache_file, exc)
        return None


def measure_matmul_flops(device: str, dtype: torch.dtype, budget_s: float) -> float | None:
    """Best FLOP/s of square matrix products on `device`, or None if `dtype` fails there.

    The matrices grow from `MATMUL_START_N` while one product is quick next to the budget,
    so a fast GPU is measured on large products and a slow CPU still stops in time.
    """
    import torch

    deadline = time.perf_counter() + budget_s
    n, best = MATMUL_START_N, 0.0
    try:
        while True:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            while True:
                step_s = _timed(device, functools.partial(torch.mm, a, b))
                best = max(best, 2.0 * n**3 / step_s)
                if time.perf_counter() >= deadline:
                    return best
                if step_s < budget_s * MATMUL_GROW_FRACTION and n < MATMUL_MAX_N:
                    break
            n *= 2
    except (RuntimeError, TypeError) as exc:
        # e.g. bfloat16 matmul unsupported by this CPU build, or out of device memory.
        logger.info("matmul %s on %s does not run here: %s", dtype, device, exc)
        return None


def measure_memory_bandwidth(device: str, budget_s: float) -> float | None:
    """Best bytes/s of copying a large tensor on `device` (read + write), or None."""
    import torch

    deadline = time.perf_counter() + budget_s
    # Large enough to spill every cache; bounded by free RAM on small machines.
    size_bytes = 1024 * MIB if device != "cpu" else 256 * MIB
    size_bytes = min(size_bytes, psutil.virtual_memory().available // 8)
    try:
        src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        best = 0.0
        while True:
            step_s = _timed(device, lambda: dst.copy_(src))
            best = max(best, 2.0 * src.numel() * 4 / step_s)
            if time.perf_counter() >= deadline:
                return best
    except RuntimeError as exc:
        logger.info("memory bandwidth of %s not measured: %s", device, exc)
        return None


def measure_disk_read(
    cache_dir: Path, budget_s: float, *, size_bytes: int = DISK_FILE_BYTES
) -> DiskRead:
    """Reads back a file just written in `cache_dir`, past the page cache where possible.

    Half the budget may go to writing (a slow disk writes less), the rest to reading. The
    file is named like `volunteer.machine.atomic`'s temporary files, so if a killed process leaves
    it behind it is swept with them.
    """
    deadline = time.perf_counter() + budget_s
    note = _page_cache_note(cache_dir)
    path = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}diskbench-", dir=cache_dir)
        path = Path(name)
        with os.fdopen(fd, "wb") as out:
            _write_until(out, size_bytes, time.perf_counter() + budget_s / 2)
            if note is None:
                try:  # clean pages (after the fsync) are dropped: the read must hit the disk
                    os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError as exc:
                    note = f"page cache not dropped ({exc}): the read may come from RAM"
        read_bytes, began = 0, time.perf_counter()
        with open(path, "rb", buffering=0) as source:
            while (not read_bytes or time.perf_counter() < deadline) and (
                data := source.read(DISK_CHUNK_BYTES)
            ):
                read_bytes += len(data)
        elapsed_s = max(time.perf_counter() - began, 1e-9)
    except OSError as exc:
        return DiskRead(None, note is not None, note=f"disk not measured: {exc}")
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    return DiskRead(read_bytes / elapsed_s, note is not None, note=note)


def _write_until(out: Any, size_bytes: int, deadline: float) -> None:
    chunk = os.urandom(DISK_CHUNK_BYTES)  # random, so a compressing filesystem can't cheat
    written = 0
    while written < size_bytes and (not written or time.perf_counter() < deadline):
        written += out.write(chunk)
    out.flush()
    os.fsync(out.fileno())


def measure_block_speed(span: BlockSpan, budget_s: float) -> BlockSpeed:
    """Times `span` at decoding (one token, KV cache) and at a batch forward, each in half
    of the budget."""
    return BlockSpeed(
        decode_tokens_per_s=measure_decode_speed(span, budget_s / 2),
        forward_tokens_per_s=measure_forward_speed(span, budget_s / 2),
    )


def measure_decode_speed(span: BlockSpan, budget_s: float) -> float:
    """One-token inference with a KV cache: tokens/s per block (as Petals measures it),
    the median of as many steps as fit in the budget (at least one after a warm-up)."""
    import torch

    weight = next(span.parameters())
    steps = min(BLOCK_DECODE_STEPS, span.config.max_position_embeddings)
    cache = span.allocate_cache(batch_size=1, max_length=steps)
    one = torch.zeros(1, 1, span.config.hidden_size, dtype=weight.dtype, device=weight.device)

    def decode(position: int) -> None:
        span(one, start_pos=position, cache=cache)
        cache.length = position + 1

    with torch.inference_mode():
        decode_s = _median_step_s(str(weight.device), decode, steps, budget_s)
    return span.num_blocks / decode_s


def choose_decode_threads(span: BlockSpan, threads: int, budget_s: float) -> tuple[int, float]:
    """The fewest torch threads (1 or `threads`) that decode one position within
    DECODE_TOLERANCE of the fastest, and that speed (tokens/s per block).

    A one-position step is many small products: on few or shared cores the OpenMP team's
    wake-ups cost what the extra threads gain, and the idle ones then only take cores
    from the next server in the route and from the volunteer. Measured on the calling
    thread, whose own count is restored after (OpenMP keeps one per thread).
    """
    import torch

    before = torch.get_num_threads()
    speeds = {}
    try:
        for count in sorted({1, max(1, threads)}):
            torch.set_num_threads(count)
            speeds[count] = measure_decode_speed(span, budget_s)
    finally:
        torch.set_num_threads(before)
    chosen = fewest_threads_near_fastest(speeds)
    return chosen, speeds[chosen]


def fewest_threads_near_fastest(speeds: dict[int, float]) -> int:
    """Of {thread count: speed}, the fewest threads within DECODE_TOLERANCE of the best."""
    fastest = max(speeds.values())
    return min(c for c, speed in speeds.items() if speed >= fastest * (1 - DECODE_TOLERANCE))


def measure_forward_speed(span: BlockSpan, budget_s: float) -> float:
    """A batch forward of BLOCK_FORWARD_TOKENS positions: tokens/s per block."""
    import torch

    weight = next(span.parameters())
    tokens = min(BLOCK_FORWARD_TOKENS, span.config.max_position_embeddings)
    batch = torch.randn(1, tokens, span.config.hidden_size, device=weight.device)
    batch = batch.to(weight.dtype)
    with torch.inference_mode():
        forward_s = _median_step_s(str(weight.device), lambda _: span(batch), 1_000_000, budget_s)
    return span.num_blocks * tokens / forward_s


def _median_step_s(
    device: str, step: Callable[[int], Any], max_steps: int, budget_s: float
) -> float:
    deadline = time.perf_counter() + budget_s
    times = [_timed(device, functools.partial(step, 0))]  # a warm-up, dropped below
    while len(times) < max(max_steps, 2) and (len(times) < 2 or time.perf_counter() < deadline):
        times.append(_timed(device, functools.partial(step, len(times))))
    return max(statistics.median(times[1:]), 1e-9)


def _timed(device: str, op: Callable[[], Any]) -> float:
    # Accelerators run asynchronously: wait for the work before reading the clock.
    _synchronize(device)
    began = time.perf_counter()
    op()
    _synchronize(device)
    return max(time.perf_counter() - began, 1e-9)


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


def _devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def _dtypes(device: str) -> list[torch.dtype]:
    import torch

    if device == "cpu":  # bfloat16 is kept only if it runs (see measure_matmul_flops)
        return [torch.float32, torch.bfloat16]
    has_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return [torch.float16, *([torch.bfloat16] if has_bf16 else []), torch.float32]


def _page_cache_note(path: Path) -> str | None:
    """Why a read in `path` cannot bypass RAM, or None when it can."""
    if not hasattr(os, "posix_fadvise"):
        return "no posix_fadvise on this OS: the read may come from the page cache"
    path = path.expanduser().absolute()
    mounts = {part.mountpoint: part.fstype for part in psutil.disk_partitions(all=True)}
    matching = [mount for mount in mounts if path.is_relative_to(mount)]
    if matching and mounts[max(matching, key=len)] in MEMORY_BACKED_FS:
        return f"{path} is on a memory-backed filesystem: this measures RAM, not a disk"
    return None
