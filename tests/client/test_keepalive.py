"""Waiting for a reply while pinging its sender: a late reply from a live server is waited
for, a server that stops answering pings is given up on in seconds.

The pings here are functions of the test's own (answering at once, or never); the real
server behind a real stream is in tests/client/test_slow_and_vanished.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from volunteer.client.keepalive import Keepalive, get_alive
from volunteer.transport.protocol import BusyError, PeerUnavailableError

FAST = Keepalive(after_s=0.05, timeout_s=0.2)
LONG_S = 60.0
"""A timeout the waits below must never reach: only the keepalive may end them."""


class Pings:
    """A ping that answers (or raises `error`, or hangs forever) and counts its calls."""

    def __init__(self, *, error: BaseException | None = None, hangs: bool = False) -> None:
        self.calls = 0
        self.error = error
        self.hangs = hangs

    async def __call__(self, timeout_s: float) -> None:
        self.calls += 1
        if self.hangs:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error


async def _put_after(queue: asyncio.Queue[str], delay_s: float, item: str) -> None:
    await asyncio.sleep(delay_s)
    await queue.put(item)


def test_a_reply_in_time_costs_no_ping() -> None:
    async def scenario() -> tuple[str, int]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        pings = Pings()
        putting = asyncio.ensure_future(_put_after(queue, 0.01, "reply"))
        keepalive = Keepalive(after_s=LONG_S, timeout_s=1.0)
        item = await get_alive(queue, LONG_S, ping=pings, keepalive=keepalive)
        await putting
        return item, pings.calls

    assert asyncio.run(scenario()) == ("reply", 0)


@pytest.mark.parametrize("answer", ["answers", "answers busy"])
def test_a_late_reply_from_a_live_server_is_waited_for(answer: str) -> None:
    async def scenario() -> tuple[str, int]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        # A server that answers, even with an error, is there.
        pings = Pings(error=BusyError("busy: computing") if answer == "answers busy" else None)
        putting = asyncio.ensure_future(_put_after(queue, 20 * FAST.after_s, "reply"))
        item = await get_alive(queue, LONG_S, ping=pings, keepalive=FAST)
        await putting
        return item, pings.calls

    item, calls = asyncio.run(scenario())
    assert item == "reply"
    assert calls >= 3  # it was pinged while computing, and not given up on


@pytest.mark.parametrize("failure", ["silent", "unreachable"])
def test_a_server_that_fails_a_ping_is_given_up_on_in_seconds(failure: str) -> None:
    async def scenario() -> tuple[float, asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        if failure == "silent":
            pings = Pings(hangs=True)
        else:
            pings = Pings(error=PeerUnavailableError("connection refused"))
        began = time.monotonic()
        with pytest.raises(PeerUnavailableError, match="keepalive ping"):
            await get_alive(queue, LONG_S, ping=pings, keepalive=FAST)
        elapsed = time.monotonic() - began
        await queue.put("late reply")
        return elapsed, queue

    elapsed, queue = asyncio.run(scenario())
    # after_s + timeout_s is 0.25 s: far under the 60 s the wait was allowed.
    assert elapsed < 10.0
    # The failed wait took nothing off the queue.
    assert queue.qsize() == 1


def test_a_late_reply_still_times_out_when_the_server_answers_pings() -> None:
    async def scenario() -> float:
        queue: asyncio.Queue[str] = asyncio.Queue()
        began = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await get_alive(queue, 0.5, ping=Pings(), keepalive=FAST)
        return time.monotonic() - began

    assert 0.5 <= asyncio.run(scenario()) < 10.0
