"""The owner's upload cap, on an injected clock: a second's worth goes out at once after a
quiet spell, then writers wait so that the average holds; a new rate applies at once."""

from __future__ import annotations

import asyncio

import pytest

from volunteer.transport.upload_limit import BURST_S, UploadLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_without_a_cap_nothing_waits_but_everything_is_counted() -> None:
    limit = UploadLimit(None, Clock())
    assert [limit.charge(1 << 20) for _ in range(100)] == [0.0] * 100
    assert limit.sent_bytes == 100 << 20


def test_a_quiet_spell_saves_a_seconds_worth_and_no_more() -> None:
    clock = Clock()
    limit = UploadLimit(8.0, clock)  # 1 MB/s
    assert limit.charge(1_000_000) == 0.0  # one second's worth: at once
    assert limit.charge(500_000) == pytest.approx(0.5)  # then its own time on the wire
    clock.now += 60  # a long quiet spell saves up no more than the burst
    assert limit.charge(1_000_000) == 0.0
    assert limit.charge(250_000) == pytest.approx(0.25)


@pytest.mark.parametrize("frame_bytes", [1_000, 64_000, 3_000_000])
def test_writers_that_wait_as_told_keep_the_average(frame_bytes: int) -> None:
    clock = Clock()
    rate_bytes_s = 2.5e6 / 8
    limit = UploadLimit(2.5, clock)
    start, sent = clock.now, 0
    while clock.now - start < 30:
        clock.now += limit.charge(frame_bytes)  # each writer sends once its wait is over
        sent += frame_bytes
        elapsed = clock.now - start
        assert sent <= rate_bytes_s * (elapsed + BURST_S) + frame_bytes
    assert sent / (clock.now - start) == pytest.approx(rate_bytes_s, rel=0.05)


def test_a_new_rate_applies_to_the_next_bytes() -> None:
    clock = Clock()
    limit = UploadLimit(8.0, clock)
    limit.charge(1_000_000)
    limit.set_rate(80.0)  # ten times faster
    assert limit.charge(1_000_000) == pytest.approx(0.1)
    limit.set_rate(None)
    assert limit.charge(50_000_000) == 0.0


def test_spend_sleeps_for_the_wait_and_adds_it_up() -> None:
    clock = Clock()
    limit = UploadLimit(0.8, clock)  # 100 kB/s
    limit.free_at = clock.now + 0.05  # owed 50 ms already, past the burst

    async def main() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await limit.spend(0)
        return loop.time() - began

    slept = asyncio.run(main())
    assert limit.waited_s == pytest.approx(0.05)
    assert slept >= 0.04
