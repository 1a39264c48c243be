"""The disk tier of offloading: what the cost model predicts against what the runtime does.

For each weight form, SmolLM2's 30 blocks are timed in memory (a decode step's compute),
the disk under the cache folder is read as `volunteer profile` reads it, and
`scheduler.offload_cost.disk_tier_step_s` predicts a decode step of the span streamed from
disk. Then the span is offloaded for real (`volunteer.models.offload`), its block files
dropped from the page cache, and decode steps are timed. Prints predicted and measured
tokens/s, their ratio, and the read bandwidth the measured steps show (the calibration
the cost model should take), then one JSON line.

    python bench/offload.py [--forms fp32,q4] [--steps 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from volunteer.models.checkpoint import SafetensorsFolder, load_span
from volunteer.models.offload import OffloadedSpan
from volunteer.models.weight_format import WeightFormat
from volunteer.scheduler.offload_cost import calibrated_read_bytes_s, disk_tier_step_s

from volunteer.machine.microbench import measure_disk_read
from volunteer.model_cache.served_model import open_model
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.paths import Paths

PREFILL = 16


def _decode_steps(span: torch.nn.Module, steps: int) -> list[float]:
    """Seconds of each one-token step after a short prefill (the first step is a warm-up)."""
    cache = span.allocate_cache(batch_size=1, max_length=PREFILL + steps + 1)
    hidden = torch.randn(1, PREFILL, span.config.hidden_size)
    times = []
    with torch.inference_mode():
        span(hidden, cache=cache)
        cache.length = PREFILL
        for position in range(PREFILL, PREFILL + steps + 1):
            began = time.perf_counter()
            span(torch.randn(1, 1, span.config.hidden_size), start_pos=position, cache=cache)
            cache.length = position + 1
            times.append(time.perf_counter() - began)
    return times[1:]


def _drop_page_cache(folder: Path) -> None:
    """Reads must come from the disk, as after a reboot: flush, then drop clean pages."""
    os.sync()
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as source:
            os.posix_fadvise(source.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _one_form(model, fmt: WeightFormat, steps: int, cache_dir: Path, read_bps: float) -> dict:
    config = model.config
    in_memory = load_span(model.folder, config, 0, config.num_layers, fmt=fmt)
    weight_bytes = sum(fmt.block_bytes(block) for block in in_memory.blocks)
    compute_s = statistics.median(_decode_steps(in_memory, steps))
    del in_memory
    predicted_s = disk_tier_step_s(weight_bytes, read_bps, compute_s)
    files = SafetensorsFolder.open(model.folder)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        span = OffloadedSpan.build(
            config,
            0,
            config.num_layers,
            Path(tmp),
            lambda i: load_span(files, config, i, i + 1, fmt=fmt).blocks[0],
        )
        try:
            _drop_page_cache(Path(tmp))
            cold_s = _decode_steps(span, 1)[0]
            measured_s = statistics.median(_decode_steps(span, steps))  # page cache warm
        finally:
            span.close()
    return {
        "form": fmt.label,
        "weight_mib": weight_bytes / 2**20,
        "compute_tps": 1 / compute_s,
        "predicted_tps": 1 / predicted_s,
        "cold_tps": 1 / cold_s,
        "measured_tps": 1 / measured_s,
        "measured_over_predicted": predicted_s / measured_s,
        "calibrated_read_mb_s": calibrated_read_bytes_s(weight_bytes, measured_s) / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", default="fp32,q4", help="weight forms, comma-separated")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = Paths.resolve(home=None, env=os.environ)
    model = open_model(DEFAULT_MODEL, paths.models_dir)
    disk = measure_disk_read(paths.cache_dir, budget_s=4.0)
    if disk.bytes_per_s is None:
        print(f"no disk figure: {disk.note}", file=sys.stderr)
        return 1
    note = f" ({disk.note})" if disk.note else ""
    print(f"disk read, as `volunteer profile` measures it: {disk.bytes_per_s / 1e6:.0f} MB/s{note}")
    rows = [
        _one_form(model, WeightFormat.parse(label), args.steps, paths.cache_dir, disk.bytes_per_s)
        for label in args.forms.split(",")
    ]
    print(
        f"{'form':8} {'weights MiB':>11} {'in RAM':>8} {'predicted':>9} {'cold':>8} "
        f"{'measured':>8} {'meas/pred':>9} {'read MB/s':>9}   (tokens/s; 30 blocks)"
    )
    for row in rows:
        print(
            f"{row['form']:8} {row['weight_mib']:11.1f} {row['compute_tps']:8.2f} "
            f"{row['predicted_tps']:9.2f} {row['cold_tps']:8.2f} {row['measured_tps']:8.2f} "
            f"{row['measured_over_predicted']:9.2f} {row['calibrated_read_mb_s']:9.0f}"
        )
    print(json.dumps({"disk_read_mb_s": disk.bytes_per_s / 1e6, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
