"""Screenshots of each screen at a fixed size with the scripted daemon (SVG snapshots in
__snapshots__/; after an intended change of the look, review and accept them with
`python -m pytest tests/tui/test_snapshots.py --snapshot-update`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input
from volunteer.tui.app import VolunteerApp

from tests.tui.fakes import FIXED_GAUGES, FakeDaemon
from tests.tui.waiting import until
from volunteer.paths import Paths

SIZE = (110, 36)
WAIT_S = 10.0
"""Bounds a hang only: the scripted daemon answers at once."""


def _app(daemon: FakeDaemon | None = None) -> VolunteerApp:
    return VolunteerApp(daemon or FakeDaemon(), gauges=lambda: FIXED_GAUGES, poll=False)


async def _load(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, VolunteerApp)
    for refresh in (app.refresh_status, app.refresh_gauges, app.refresh_swarm, app.refresh_status):
        refresh()
        await app.workers.wait_for_complete()
        await pilot.pause()


def test_dashboard(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_load)


def test_dashboard_without_a_daemon(snap_compare: Any) -> None:
    assert snap_compare(_app(FakeDaemon(running=False)), terminal_size=SIZE, run_before=_load)


def test_swarm(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_load, press=["3"])


def test_leaderboard(snap_compare: Any) -> None:
    assert snap_compare(_app(), terminal_size=SIZE, run_before=_load, press=["5"])


def test_chat_after_an_answer(snap_compare: Any) -> None:
    async def ask(pilot: Pilot[Any]) -> None:
        await _load(pilot)
        await pilot.press("2")
        prompt = pilot.app.query_one("#prompt", Input)
        prompt.focus()
        prompt.value = "What is the capital of France?"
        await pilot.press("enter")
        await pilot.app.workers.wait_for_complete()
        await until(pilot, lambda: not pilot.app.query(".streaming"), "the Markdown", WAIT_S)
        pilot.app.set_focus(None)  # no blinking cursor in the picture
        await pilot.pause()

    assert snap_compare(_app(), terminal_size=SIZE, run_before=ask)


def test_settings(snap_compare: Any, tmp_path: Path) -> None:
    paths = Paths.resolve(home=tmp_path / "home", env={})
    paths.config_file.parent.mkdir(parents=True)
    paths.config_file.write_text('public_name = "ada"\nthreads = 2\n', encoding="utf-8")

    async def open_settings(pilot: Pilot[Any]) -> None:
        await _load(pilot)
        await pilot.press("4")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        pilot.app.set_focus(None)  # no blinking cursor in the picture
        await pilot.pause()

    app = _app(FakeDaemon(paths=paths))
    assert snap_compare(app, terminal_size=SIZE, run_before=open_settings)
