"""A daemon's freed KV caches leave its memory (glibc), measured in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHURN = """
import sys, psutil, torch
from volunteer.machine.memory_tuning import return_large_frees_to_the_os
tuned = return_large_frees_to_the_os() if sys.argv[1] == "tuned" else None
process = psutil.Process()
before = process.memory_info().rss
for _ in range(6):  # a session's cache each: allocated, filled, freed
    cache = torch.empty(14 << 20, dtype=torch.uint8)
    cache.fill_(1)
    del cache
    small = torch.ones(256 << 10, dtype=torch.uint8)  # something of the heap's in between
print(tuned, (process.memory_info().rss - before) >> 20)
"""


def _churn(mode: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120, check=True
    )
    tuned, grown_mib = done.stdout.split()
    return tuned, int(grown_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_caches_go_back_to_the_os() -> None:
    tuned, grown = _churn("tuned")
    assert tuned == "True"
    assert grown < 8
    # The reference: without the setting, the same churn keeps memory resident.
    _, untuned = _churn("plain")
    assert untuned >= 12
