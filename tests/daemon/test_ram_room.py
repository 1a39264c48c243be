"""The RAM the daemon may take on: what is free, within the owner's cap while in use (the
cap's share of the machine less what the daemon holds already); the plan of `volunteer
profile` (as the daemon's) is made within it and says so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import psutil
import pytest

from tests.server import tiny_config
from volunteer.commands.profile_report import decide
from volunteer.daemon.ram_room import ram_room, room_within_cap
from volunteer.machine.hardware import collect_hardware
from volunteer.machine.microbench import run_microbenchmarks
from volunteer.machine.owner_sensors import tree_rss_bytes
from volunteer.settings import Settings

GIB = 1 << 30


@pytest.mark.parametrize(
    ("settings", "room_gib", "is_capped"),
    [
        (Settings(), 20.0, False),  # no cap: what is free
        (Settings(max_ram_percent_in_use=25), 6.0, True),  # 8 GiB of 32, 2 held
        (Settings(max_ram_percent_idle=25), 6.0, True),  # the idle cap holds in use too
        (Settings(max_ram_percent_in_use=25, max_ram_percent_idle=90), 6.0, True),
        (Settings(max_ram_percent_in_use=90), 20.0, False),  # 26.8 GiB left: free binds
        (Settings(max_ram_percent_in_use=5), 0.0, True),  # 1.6 GiB: held more already
    ],
)
def test_the_cap_while_in_use_bounds_what_is_free(
    settings: Settings, room_gib: float, is_capped: bool
) -> None:
    room = room_within_cap(settings, free_bytes=20 * GIB, total_bytes=32 * GIB, held_bytes=2 * GIB)
    assert room.available_bytes == pytest.approx(room_gib * GIB, abs=1 << 20)
    assert (room.note is not None) == is_capped
    if is_capped:
        assert "leaves" in room.note and "beside the 2.00 GiB the daemon holds" in room.note


def test_the_room_is_measured_from_this_machine_and_process() -> None:
    total = psutil.virtual_memory().total
    held = tree_rss_bytes(psutil.Process())
    assert held > 0
    cap = 100 * (held + 64 * (1 << 20)) / total  # 64 MiB more than this process holds
    room = ram_room(Settings(max_ram_percent_in_use=min(cap, 100)))
    assert room.available_bytes <= 64 * (1 << 20) + (8 << 20)  # it grew a little at most
    assert ram_room(Settings()).note is None


def test_the_plan_is_made_within_the_owners_cap(tmp_path: Path) -> None:
    hardware = dataclasses.replace(
        collect_hardware(tmp_path), ram_total_bytes=64 * GIB, ram_available_bytes=48 * GIB
    )
    bench = run_microbenchmarks(tmp_path, budget_s=0.2)
    config = tiny_config(12)
    free = decide(
        hardware=hardware, bench=bench, settings=Settings(), config=config,
        model_name="tiny", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert "owner's RAM cap" not in free.blocks_reason
    capped = decide(
        hardware=hardware, bench=bench, settings=Settings(max_ram_percent_in_use=20),
        config=config, model_name="tiny", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert "the owner's RAM cap of 20% (12.80 GiB) leaves" in capped.blocks_reason
    tiny_cap = Settings(max_ram_percent_in_use=0.1)  # 65 MiB of 64 GiB: held already
    none = decide(
        hardware=hardware, bench=bench, settings=tiny_cap, config=config,
        model_name="tiny", snapshot=None, swarm_source="none",
    )  # fmt: skip
    assert none.blocks is None and "not one block fits" in none.blocks_reason
