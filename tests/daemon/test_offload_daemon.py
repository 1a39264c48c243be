"""A daemon told to serve more blocks than its RAM limit holds streams them from disk: a
real daemon serving all 30 blocks of SmolLM2 in float32 (424 MiB of weights) under
`--max-ram-gib 0.25` answers exactly as `volunteer chat --local` does, and its resident
memory beyond a bare daemon's stays under the limit. Its first steps are set against the
cost model's prediction, and calibrate the disk's read rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.daemon.homes import DaemonSwarm, Homes
from volunteer.control.endpoint import use_tcp
from volunteer.machine.calibration import load_calibration

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

PROMPT = "What is the capital of France?"
LIMIT_GIB = 0.25
SPAN_WEIGHT_BYTES = 30 * 14_160_384
"""SmolLM2-135M's 30 blocks in float32: larger than the limit."""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[DaemonSwarm]:
    homes = Homes(tmp_path_factory.mktemp("offload"))
    swarm = DaemonSwarm(homes, smollm2_folder, new_tokens="24", chat_timeout_s=240)
    try:
        swarm.start("boot", "--num-blocks", "0")
        swarm.start("server", "--blocks", "0:30", "--max-ram-gib", str(LIMIT_GIB))
        yield swarm
    finally:
        homes.reap()


def _rss(swarm: DaemonSwarm, name: str) -> int:
    pid = swarm.homes.remember(swarm.homes.home(name))
    assert pid is not None
    return psutil.Process(pid).memory_info().rss


def test_a_span_larger_than_the_ram_limit_streams_from_disk_and_answers_the_same(
    swarm: DaemonSwarm,
) -> None:
    assert SPAN_WEIGHT_BYTES > LIMIT_GIB * 2**30
    status = swarm.homes.status(swarm.homes.home("server"))
    assert status["blocks"] == [0, 30]
    assert "stream from disk" in status["span_reason"]
    # Its first steps were timed against the cost model, and their reads calibrate it.
    assert "the cost model predicted" in status["span_reason"]
    assert "measured" in status["span_reason"]
    kept = load_calibration(swarm.homes.root / "cache")
    assert kept is not None and kept.source == "blocks 0:30 in fp32"
    # The boot daemon serves nothing and has run no chat yet: what a daemon takes bare.
    bare = _rss(swarm, "boot")
    local = swarm.chat("--local", "--model", str(swarm.model), PROMPT)
    assert local.returncode == 0, local.stderr
    served = swarm.chat("--verify", "off", PROMPT)
    assert served.returncode == 0, served.stderr
    assert served.stdout == local.stdout
    assert "Paris" in served.stdout
    beyond_bare = _rss(swarm, "server") - bare
    assert beyond_bare < LIMIT_GIB * 2**30, f"{beyond_bare / 2**20:.0f} MiB beyond a bare daemon"
