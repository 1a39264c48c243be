"""How close each micro-benchmark keeps to its time budget on this machine.

Each benchmark stops once its budget is spent, after one measurement at least, so it may
run past the budget by up to one measurement (and a first, cold one). The tests check
that a spent budget still measures and stops; the figures of how far past it each goes
are this machine's, and are printed here: per benchmark and budget, the median elapsed
seconds over `--repeats` runs and its ratio to the budget. Then one JSON line with every
figure, keyed `<benchmark>@<budget>`.

    python bench/microbench_budget.py [--budgets 0.1 0.3 1.0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan

from volunteer.machine.microbench import (
    measure_block_speed,
    measure_disk_read,
    measure_matmul_flops,
    measure_memory_bandwidth,
    run_microbenchmarks,
)


def _tiny_span() -> BlockSpan:
    # The tests' tiny llama shape: the budget, not the model, is what is measured here.
    config = ModelConfig(
        arch="llama", vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128,
    )  # fmt: skip
    return BlockSpan(config, 0, 2).eval()


def _benchmarks(folder: Path, span: BlockSpan) -> dict[str, Callable[[float], Any]]:
    return {
        "matmul_cpu_float32": lambda budget_s: measure_matmul_flops("cpu", torch.float32, budget_s),
        "memory_bandwidth_cpu": lambda budget_s: measure_memory_bandwidth("cpu", budget_s),
        "disk_read": lambda budget_s: measure_disk_read(folder / "disk", budget_s),
        "block_speed": lambda budget_s: measure_block_speed(span, budget_s),
        "all": lambda budget_s: run_microbenchmarks(folder / "all", budget_s=budget_s, span=span),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        benchmarks = _benchmarks(Path(folder), _tiny_span())
        print(f"{'benchmark':<22} {'budget s':>9} {'elapsed s':>10} {'ratio':>7}")
        for name, run in benchmarks.items():
            for budget_s in args.budgets:
                times = []
                for _ in range(args.repeats):
                    began = time.perf_counter()
                    run(budget_s)
                    times.append(time.perf_counter() - began)
                elapsed_s = statistics.median(times)
                figures[f"{name}@{budget_s:g}"] = round(elapsed_s, 4)
                ratio = elapsed_s / budget_s
                print(f"{name:<22} {budget_s:>9g} {elapsed_s:>10.3f} {ratio:>7.2f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
