"""Waiting in Pilot tests on what the screen shows, not on time: a condition is polled
between turns of the app's loop, with a deadline that only bounds a hang."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

POLL_S = 0.05


async def until(pilot: object, check: Callable[[], object], what: str, timeout_s: float) -> None:
    """Lets the app run until `check()` is true; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s:g} s for {what}")
        await pilot.pause(POLL_S)  # type: ignore[attr-defined]
