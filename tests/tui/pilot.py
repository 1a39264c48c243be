"""Running the TUI against a scripted daemon in a test: the app under Textual's pilot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from volunteer.tui.app import VolunteerApp

from tests.tui.fakes import FIXED_GAUGES, FakeDaemon

SIZE = (120, 40)
WAIT_S = 10.0
"""Bounds a hang only: the scripted daemon answers at once."""


def run(
    scenario: Callable[[VolunteerApp, object], Awaitable[None]],
    daemon: FakeDaemon,
    *,
    poll: bool = False,
) -> None:
    """Runs `scenario(app, pilot)` on an app of `daemon` (polling it on timers if `poll`)."""

    async def main() -> None:
        app = VolunteerApp(daemon, gauges=lambda: FIXED_GAUGES, poll=poll)
        async with app.run_test(size=SIZE) as pilot:
            await scenario(app, pilot)

    asyncio.run(main())


async def settle(app: VolunteerApp, pilot: object) -> None:
    """Waits for the app's workers, then for the screen to catch up."""
    await app.workers.wait_for_complete()
    await pilot.pause()  # type: ignore[attr-defined]
