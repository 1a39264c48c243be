"""Micro-benchmarks on this machine: they measure something, stop once their budget is
spent, and their cache is reused only for the same hardware.

How close each keeps to its budget is a figure of the machine, printed by
`bench/microbench_budget.py`; here a spent budget (0 s) must still give a measurement
and stop after it, which a benchmark that ignored its deadline would not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.server import random_span, tiny_config
from volunteer.machine.microbench import (
    MicroBenchmarks,
    choose_decode_threads,
    fewest_threads_near_fastest,
    load_or_run,
    measure_block_speed,
    measure_disk_read,
    measure_matmul_flops,
    measure_memory_bandwidth,
    run_microbenchmarks,
)

BUDGET_S = 0.6
SPENT_S = 0.0
"""A budget spent before the first measurement ends: one measurement, then stop."""


def counting_run(calls: list[float]) -> Callable[..., MicroBenchmarks]:
    """`run_microbenchmarks`, noting each call's budget in `calls`."""

    def run(cache_dir: Path, **kwargs: Any) -> MicroBenchmarks:
        calls.append(kwargs["budget_s"])
        return run_microbenchmarks(cache_dir, **kwargs)

    return run


def test_run_measures_cpu_memory_and_disk(tmp_path: Path) -> None:
    began = time.perf_counter()
    results = run_microbenchmarks(tmp_path, budget_s=BUDGET_S)
    assert 0 < results.elapsed_s <= time.perf_counter() - began
    assert results.matmul_flops["cpu/float32"] > 0
    assert all(key.count("/") == 1 for key in results.matmul_flops)
    assert results.memory_bandwidth_bytes_per_s["cpu"] > 0
    assert results.disk_read_bytes_per_s is not None and results.disk_read_bytes_per_s > 0
    assert results.block_throughput is None and results.block_forward_throughput is None
    assert list(tmp_path.iterdir()) == []  # the disk benchmark's file is gone


def test_a_spent_budget_still_measures_everything_once(tmp_path: Path) -> None:
    span = random_span(tiny_config(num_layers=2))
    results = run_microbenchmarks(tmp_path, budget_s=SPENT_S, span=span)
    assert results.matmul_flops["cpu/float32"] > 0
    assert results.memory_bandwidth_bytes_per_s["cpu"] > 0
    assert results.disk_read_bytes_per_s is not None and results.disk_read_bytes_per_s > 0
    assert results.block_throughput is not None and results.block_throughput > 0


@pytest.mark.parametrize("budget_s", [SPENT_S, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_measures_within_any_budget(dtype: torch.dtype, budget_s: float) -> None:
    flops = measure_matmul_flops("cpu", dtype, budget_s)
    assert flops is None or (math.isfinite(flops) and flops > 0)
    if dtype == torch.float32:
        assert flops is not None


@pytest.mark.parametrize("budget_s", [SPENT_S, 0.2])
def test_memory_bandwidth_measures_within_any_budget(budget_s: float) -> None:
    bandwidth = measure_memory_bandwidth("cpu", budget_s)
    assert bandwidth is not None and bandwidth > 0


def test_disk_read_goes_past_the_page_cache_on_a_real_disk(tmp_path: Path) -> None:
    cache = tmp_path / "new-cache"
    disk = measure_disk_read(cache, 0.5, size_bytes=16 * 1024**2)
    assert disk.bytes_per_s is not None and disk.bytes_per_s > 0
    assert list(cache.iterdir()) == []
    on_tmpfs = disk.note is not None and "memory-backed" in disk.note
    if hasattr(os, "posix_fadvise") and not on_tmpfs:
        assert not disk.is_page_cache_bound and disk.note is None
    else:
        assert disk.is_page_cache_bound and disk.note


def test_disk_read_on_tmpfs_says_it_measured_ram() -> None:
    shm = Path("/dev/shm")
    if not hasattr(os, "posix_fadvise") or not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm here")
    disk = measure_disk_read(shm, 0.3, size_bytes=4 * 1024**2)
    assert disk.is_page_cache_bound
    assert disk.note is not None and "memory-backed" in disk.note


def test_disk_read_of_an_unwritable_dir_is_a_note(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    disk = measure_disk_read(blocked / "cache", 0.2)
    assert disk.bytes_per_s is None
    assert disk.note is not None and disk.note.startswith("disk not measured")


def test_block_speed_of_a_tiny_span() -> None:
    span = random_span(tiny_config(num_layers=2))
    speed = measure_block_speed(span, 0.4)
    for tokens_per_s in (speed.decode_tokens_per_s, speed.forward_tokens_per_s):
        assert math.isfinite(tokens_per_s) and tokens_per_s > 0


def test_decode_threads_are_the_fewest_near_the_fastest() -> None:
    assert fewest_threads_near_fastest({1: 100.0, 2: 102.0}) == 1  # noise: fewer
    assert fewest_threads_near_fastest({1: 100.0, 2: 130.0}) == 1  # within 25%: fewer
    assert fewest_threads_near_fastest({1: 100.0, 2: 140.0}) == 2
    assert fewest_threads_near_fastest({1: 100.0, 2: 180.0}) == 2
    assert fewest_threads_near_fastest({1: 100.0, 2: 90.0}) == 1
    assert fewest_threads_near_fastest({4: 50.0}) == 4


def test_choose_decode_threads_measures_and_restores_the_count() -> None:
    span = random_span(tiny_config(num_layers=2))
    before = torch.get_num_threads()
    threads, speed = choose_decode_threads(span, 2, 0.1)
    assert threads in (1, 2) and math.isfinite(speed) and speed > 0
    assert torch.get_num_threads() == before
    assert choose_decode_threads(span, 1, 0.1)[0] == 1


def test_run_with_a_span_fills_block_throughput(tmp_path: Path) -> None:
    span = random_span(tiny_config(num_layers=2))
    results = run_microbenchmarks(tmp_path, budget_s=1.0, span=span)
    assert results.block_throughput is not None and results.block_throughput > 0
    assert results.block_forward_throughput is not None


def test_json_round_trip(tmp_path: Path) -> None:
    results = run_microbenchmarks(tmp_path, budget_s=0.3)
    data = json.loads(json.dumps(results.to_json()))
    assert MicroBenchmarks.from_json(data) == results
    assert MicroBenchmarks.from_json({**data, "added_later": [1, 2]}) == results


def test_cache_hit_does_not_run_again(tmp_path: Path) -> None:
    calls: list[float] = []
    cache_file = tmp_path / "bench.json"
    first = load_or_run(
        cache_file, "abc", cache_dir=tmp_path, budget_s=0.3, run=counting_run(calls)
    )
    assert calls == [0.3]
    assert json.loads(cache_file.read_text())["fingerprint"] == "abc"
    second = load_or_run(cache_file, "abc", cache_dir=tmp_path, run=counting_run(calls))
    assert calls == [0.3]
    assert second == first
    # Other hardware: measured again, and the file now holds the new fingerprint.
    load_or_run(cache_file, "def", cache_dir=tmp_path, budget_s=0.2, run=counting_run(calls))
    assert calls == [0.3, 0.2]
    assert json.loads(cache_file.read_text())["fingerprint"] == "def"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench.json"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"format": 1, "fingerprint": "abc", "results": {}}'],
)
def test_corrupt_cache_is_replaced(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []
    cache_file = tmp_path / "bench.json"
    cache_file.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="volunteer.machine.microbench"):
        fresh = load_or_run(
            cache_file, "abc", cache_dir=tmp_path, budget_s=0.2, run=counting_run(calls)
        )
    assert calls == [0.2]
    assert "corrupt benchmark cache" in caplog.text
    record = json.loads(cache_file.read_text())
    assert MicroBenchmarks.from_json(record["results"]) == fresh
    assert load_or_run(cache_file, "abc", cache_dir=tmp_path, run=counting_run(calls)) == fresh
    assert calls == [0.2]
